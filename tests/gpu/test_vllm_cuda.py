"""CUDA vLLM as passn's sampler: weights pushed in memory equal a fresh engine on them, `passn
serve` on a GPU replica answers the official client, `passn evaluate --checkpoint` samples on CUDA."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from passn.config import TinyModelSpec
from passn.models import build_tiny_model, write_model_folder

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).parents[2]
PROMPTS = ["abc=", "fedcba=", "bdf=", "acegik=", "cab=", "hgfe="]
TOKEN = "gpu-test-token-not-a-secret"


def _folder(root: Path, seed: int) -> tuple[str, torch.nn.Module]:
    model, tokenizer = build_tiny_model(TinyModelSpec(), seed=seed)
    model = model.to(torch.bfloat16)
    folder = str(root / f"m{seed}")
    write_model_folder(model, tokenizer, folder)
    return folder, model


def test_weights_pushed_in_memory_equal_a_fresh_engine_on_them(tmp_path):
    import ray

    from actors.sampler import SamplerPool
    from passn.weight_push import SharedWeights

    first, _ = _folder(tmp_path, 0)
    second, model = _folder(tmp_path, 1)
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False)
    try:
        options = dict(num_actors=1, backend="vllm", max_model_len=64, dtype="bfloat16", gpus_per_actor=0.3,
                       kv_cache_bytes=256 << 20, start_timeout_s=600)
        pool = SamplerPool(first, **options)
        model = model.cuda()  # the driver is the "trainer": its CUDA weights, shared by IPC handles
        shared = SharedWeights.of(model, torch.bfloat16)
        assert shared.cuda and len(shared.names) == len(list(model.parameters()))
        started = time.perf_counter()
        pool.load_weights(shared, version=1)
        push_s = time.perf_counter() - started
        pushed, _ = pool.generate(PROMPTS, 1, 0.0, 12)
        sampled, _ = pool.generate(PROMPTS, 8, 1.0, 12, seed=5)
        pool.shutdown()
        fresh_pool = SamplerPool(second, **options)
        fresh, _ = fresh_pool.generate(PROMPTS, 1, 0.0, 12)
        fresh_sampled, _ = fresh_pool.generate(PROMPTS, 8, 1.0, 12, seed=5)
        fresh_pool.shutdown()
    finally:
        ray.shutdown()
    print(f"push of {shared}: {push_s:.3f} s")
    assert [c.token_ids for c in pushed] == [c.token_ids for c in fresh]  # greedy tokens identical
    for a, b in zip(pushed, fresh):
        assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-3)
    assert [c.token_ids for c in sampled] == [c.token_ids for c in fresh_sampled]  # seeded samples too


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory):
    import socket

    root = tmp_path_factory.mktemp("serve")
    folder, _ = _folder(root, 0)
    (root / "token").write_text(TOKEN + "\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(root / "serve.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "serve", "--checkpoint", f"base={folder}", "--port", str(port),
         "--token-file", str(root / "token"), "--gpus-per-replica", "0.5", "--max-ongoing", "8", "--max-queued", "8",
         "--max-n", "64", "--max-tokens", "32"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PASSN_SERVE_TOKEN": ""},
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.time() + 400
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=10).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, Path(log.name).read_text()[-3000:]
        time.sleep(2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("passn serve did not become healthy:\n" + Path(log.name).read_text()[-3000:])
    yield {"url": url, "root": root, "folder": folder, "log": Path(log.name)}
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_serve_on_a_gpu_replica_answers_the_openai_client(gpu_server):
    import httpx
    import openai

    client = openai.OpenAI(base_url=gpu_server["url"] + "/v1", api_key=TOKEN, max_retries=0)
    out = client.completions.create(model="base", prompt="abc=", n=8, logprobs=1, max_tokens=6, temperature=1.0,
                                    seed=3)
    assert len(out.choices) == 8
    assert all(len(ch.logprobs.token_logprobs) >= 1 and all(v <= 0 for v in ch.logprobs.token_logprobs)
               for ch in out.choices)
    again = client.completions.create(model="base", prompt="abc=", n=8, logprobs=1, max_tokens=6, temperature=1.0,
                                      seed=3)
    assert [ch.text for ch in again.choices] == [ch.text for ch in out.choices]  # seeded repeats identical

    async def burst():
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=250)) as http:
            body = {"model": "base", "prompt": "abcdefg=", "n": 16, "max_tokens": 16, "temperature": 1.0}
            return await asyncio.gather(*[
                http.post(gpu_server["url"] + "/v1/completions", json=body,
                          headers={"Authorization": f"Bearer {TOKEN}"}) for _ in range(200)])

    started = time.perf_counter()
    codes = [r.status_code for r in asyncio.run(burst())]
    print(f"200-request burst in {time.perf_counter() - started:.1f} s:",
          {c: codes.count(c) for c in sorted(set(codes))})
    assert len(codes) == 200 and set(codes) <= {200, 429, 503}, sorted(set(codes))
    assert codes.count(200) >= 8


def test_evaluate_a_checkpoint_with_vllm_on_cuda(gpu_server, tmp_path):
    out = tmp_path / "eval"
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "evaluate", "--checkpoint", gpu_server["folder"],
                           "--config", str(ROOT / "configs" / "tiny.yaml"), "--samples", "64", "--limit", "32",
                           "--gpus-per-sampler", "0.4", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems"] == 32 and "vllm SamplerPool x 1 (0.4 GPU each)" in json.dumps(summary)
    rows = [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()]
    assert all(r["samples"] == 64 for r in rows)
