"""Samplers pinned to their training worker's GPU (resources.sampler_gpu = 'worker'): on a node
with several GPUs each worker's samplers run on that worker's own GPU, and Ray accounts their share
to the worker. The node here is a local Ray cluster that declares two GPUs (Ray assigns GPU ids and
CUDA_VISIBLE_DEVICES without touching a device); the engines themselves run on the CPU."""

import pytest
import ray

from passn.config import TinyModelSpec
from passn.models import build_tiny_model

pytestmark = pytest.mark.integration


@ray.remote(num_gpus=0.9, num_cpus=0)
class Worker:
    """Stands in for a training worker: asks for its share and its sampler's, as jobs/train.py does."""

    def start(self, folder: str) -> dict:
        from actors.sampler import SamplerPool

        own = [str(i) for i in ray.get_gpu_ids()]
        self.pool = SamplerPool(folder, num_actors=1, backend="transformers", gpus_per_actor=0.4,
                                cpus_per_actor=0.5, gpu_ids=own, start_timeout_s=300)
        completions, _ = self.pool.generate(["abc="], 2, 1.0, 3, seed=0)
        state = ray.get(self.pool.actors[0].state.remote())
        return {"worker": own, "sampler": state["visible_devices"], "completions": len(completions)}


def test_each_workers_sampler_runs_on_that_workers_gpu_and_takes_no_share_of_its_own(tmp_path):
    model, tokenizer = build_tiny_model(TinyModelSpec(), seed=0)
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "m")
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        workers = [Worker.remote() for _ in range(2)]
        seen = ray.get([w.start.remote(str(tmp_path / "m")) for w in workers], timeout=600)
        free = ray.available_resources().get("GPU", 0.0)
    finally:
        ray.shutdown()
    assert sorted(s["worker"][0] for s in seen) == ["0", "1"]  # one worker a GPU
    for s in seen:
        assert s["sampler"] == s["worker"][0] and s["completions"] == 2, s
    assert free == pytest.approx(0.2)  # 2 x 0.9 for the workers; the samplers asked Ray for none
