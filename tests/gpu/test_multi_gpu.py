"""Several GPUs of one host (skipped where there are fewer than two): passn's training path across
them (`passn bench train --gpus`), DCOa with two training workers each sampling on its own GPU
(resources.sampler_gpu = 'worker'), DCOa with its sampler on another GPU (weights over NCCL), and `passn serve` with a replica on each GPU and with one
tensor-parallel replica over two GPUs, answering the official client."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_online_cuda import ONE_GPU, TASK, pretrained  # noqa: F401 (pretrained: the CE-trained start, a fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs or more")]
ROOT = Path(__file__).parents[2]
TOKEN = "gpu-test-token-not-a-secret"


def test_bench_train_scales_over_two_gpus_at_zero_2_and_3(tmp_path):
    out = tmp_path / "scaling.json"
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "bench", "train", "--gpus", "1,2", "--zero", "2,3",
                           "--model", "1b", "--steps", "10", "--warmup", "3", "--sequences", "4", "--length", "1024",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {(r["gpus"], r["zero_stage"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(1, 2), (2, 2), (1, 3), (2, 3)} and not any("error" in r for r in rows.values()), rows
    assert all(0.3 < r["scaling_efficiency"] <= 1.2 for r in rows.values()), rows  # the figure itself is reported


def test_dcoa_with_two_workers_each_sampling_on_its_own_gpu(pretrained, tmp_path):  # noqa: F811
    from jobs.train import run_training
    from passn.config import load_config

    cfg = load_config(str(ROOT / "configs" / "tiny-dcoa.yaml"), [
        "model.tiny=null", f"model.path={pretrained}", *TASK, *ONE_GPU, "resources.num_workers=2", "optim.epochs=1",
        "objective.ce_warmup_steps=1", "resources.sampler_gpu_fraction=0.4", "resources.sampler_backend=vllm",
        "resources.sampler_check_every=1", "objective.budget=16", "objective.mc_samples=32"])
    assert cfg.samplers_share_worker_gpu() and cfg.gpus_per_training_worker() == pytest.approx(0.9)
    rows = run_training(cfg, str(tmp_path))
    assert [r["step"] for r in rows][:4] == [1, 2, 3, 4], rows
    assert all(r["sampled_tokens"] > 0 and r["gpu_peak_gb"] > 0 for r in rows[1:]), rows
    assert all(r["push_mb"] > 0 for r in rows[2:] if r.get("syncs")), rows  # in memory (CUDA IPC) on each GPU


def test_dcoa_with_its_sampler_on_another_gpu_takes_the_weights_over_nccl(pretrained, tmp_path):  # noqa: F811
    """Disaggregated: the training worker on one GPU, its vLLM engine on another (a whole GPU Ray
    places), the weights broadcast over NCCL after every step and checked against the trainer's."""
    from jobs.train import run_training
    from passn.config import load_config

    cfg = load_config(str(ROOT / "configs" / "tiny-dcoa.yaml"), [
        "model.tiny=null", f"model.path={pretrained}", *TASK, *ONE_GPU, "resources.gpus_per_worker=1",
        "optim.epochs=1", "objective.ce_warmup_steps=1", "resources.sampler_gpu=ray",
        "resources.sampler_gpu_fraction=1", "resources.sampler_backend=vllm", "resources.sampler_check_every=1",
        "objective.budget=16", "objective.mc_samples=32"])
    assert not cfg.samplers_share_worker_gpu()
    rows = run_training(cfg, str(tmp_path))
    pushed = [r for r in rows[2:] if r.get("syncs")]
    assert len(pushed) >= 2 and all(r["push_mb"] > 0 and r.get("push_broadcast") == 1 for r in pushed), rows
    assert all(r["sync_logp_gap_per_token"] < 5e-3 for r in pushed), rows


@pytest.mark.parametrize("layout", [["--replicas", "2", "--gpus-per-replica", "1"],
                                    ["--tensor-parallel", "2", "--gpus-per-replica", "2"]],
                         ids=["a-replica-per-gpu", "tensor-parallel-2"])
def test_serve_over_two_gpus_answers_the_openai_client(tmp_path, passn_serve, layout):
    import openai

    from passn.config import TinyModelSpec
    from passn.models import build_tiny_model, write_model_folder

    model, tokenizer = build_tiny_model(TinyModelSpec(), seed=0)
    write_model_folder(model.to(torch.bfloat16), tokenizer, str(tmp_path / "m"))
    (tmp_path / "token").write_text(TOKEN + "\n")
    args = ["--checkpoint", f"base={tmp_path / 'm'}", "--token-file", str(tmp_path / "token"), *layout,
            "--max-ongoing", "8", "--max-queued", "64", "--max-n", "64", "--max-tokens", "32"]
    with passn_serve(args, tmp_path / "serve.log", 600, env={"PASSN_SERVE_TOKEN": ""}) as (_, url):
        client = openai.OpenAI(base_url=url + "/v1", api_key=TOKEN, max_retries=0)
        first = client.completions.create(model="base", prompt="abc=", n=8, logprobs=1, max_tokens=6, seed=3)
        again = client.completions.create(model="base", prompt="abc=", n=8, logprobs=1, max_tokens=6, seed=3)
        many = [client.completions.create(model="base", prompt="fedcba=", n=16, max_tokens=8) for _ in range(20)]
    assert len(first.choices) == 8 and [c.text for c in again.choices] == [c.text for c in first.choices]
    assert all(len(m.choices) == 16 for m in many)
