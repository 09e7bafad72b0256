"""The Ray Serve application behind `passn serve`: an OpenAI-compatible completions API over trained
checkpoints.

    Gateway (ingress, FastAPI)  -- auth, validation, routing by model id, timeouts, /health
      └─ ModelServer per checkpoint  -- one in-process vLLM engine, requests batched by serve.batch

Thin by design: parsing, limits and response bodies live in ``passn.openai_api``. Backpressure is
Serve's own: both deployments have ``max_ongoing_requests`` and ``max_queued_requests``; a full
gateway queue is answered 503 by Serve's proxy, a full model queue 503 by the gateway, each with
``Retry-After``. A request that runs past the timeout is cancelled and answered 504.

Health is cheap and bounded: a replica answers from the time of its last generation (any request)
and probes its engine for real at most once per ``HEALTH_FRESH_S``, one probe shared by all callers;
the gateway's ``/health`` caches each model's answer for ``HEALTH_CACHE_S``. Serve calls each
replica's ``check_health``, which fails once the engine (its own process) is dead or an engine call
runs past ``hang_timeout_s``: Serve then restarts the replica. A dead engine, a replica lost
mid-request and a draining gateway (``Gateway.drain``, what `passn serve` calls on SIGTERM) are
answered 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import (BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError,
                                  RequestCancelledError)

from actors.sampler import ENGINE_ENV, VLLMEngine
from passn.openai_api import (ApiError, Limits, check_bearer, completion_body, logprobs_body, models_body,
                              parse_completion_request)

MAX_BODY_BYTES = 4 << 20
RETRY_AFTER_S = 1
HEALTH_FRESH_S = 5.0  # a replica whose last generation is this recent is healthy without a probe
HEALTH_CACHE_S = 1.0  # the gateway answers /health from a model's last check this long
HEALTH_BURST = 512  # gateway slots beyond the completions' for /health calls
HEALTH_CHECK_PERIOD_S = 2.0  # Serve's check_health period; three failures in a row restart a replica
SERVE_ENGINE_ENV = {**ENGINE_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}  # the engine core in its own process


class EngineUnavailable(RuntimeError):
    """The replica's engine is dead or hangs: answered 503 until Serve has restarted the replica."""


@serve.deployment(max_ongoing_requests=32, max_queued_requests=64, ray_actor_options={"num_cpus": 0.5},
                  health_check_period_s=HEALTH_CHECK_PERIOD_S, health_check_timeout_s=30)
class ModelServer:
    """One checkpoint in one vLLM engine; concurrent requests are batched into one engine call."""

    def __init__(self, model_id: str, model_dir: str, max_model_len: int, kv_cache_bytes: int, dtype: str,
                 max_batch_size: int, hang_timeout_s: float = 120.0, tensor_parallel: int = 1) -> None:
        from passn.models import fetch_model_folder

        os.environ.update(SERVE_ENGINE_ENV)
        self.model_id, self.max_model_len = model_id, max_model_len
        self.engine = VLLMEngine(fetch_model_folder(model_dir), max_model_len, kv_cache_bytes, dtype, seed=0,
                                 engine_process=True, tensor_parallel=tensor_parallel)
        self.tokenizer = self.engine.tokenizer
        self.complete.set_max_batch_size(max_batch_size)
        self.watch_health(hang_timeout_s)

    def watch_health(self, hang_timeout_s: float) -> None:
        self.lock = asyncio.Lock()  # one engine call at a time (batches and health probes)
        self.hang_timeout_s = hang_timeout_s
        self.failure: str | None = None  # why the engine is dead, once it is
        self.last_ok = time.monotonic()  # when the last engine call finished
        self.busy_since: float | None = None  # when the engine call now running began
        self.probe: asyncio.Future | None = None  # the one health probe in flight

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def complete(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        results: list[dict[str, Any]] = [{} for _ in requests]
        flat_prompts, flat_params, owners = [], [], []
        for r, req in enumerate(requests):
            try:
                encoded = encode_prompts(self.tokenizer, req["prompts"])
            except ApiError as e:  # this request alone: the others batched with it go on
                results[r] = e.body()
                continue
            too_long = [i for i, ids in enumerate(encoded) if len(ids) + req["max_tokens"] > self.max_model_len]
            if too_long:
                i = too_long[0]
                results[r] = ApiError(400, f"prompt {i}: {len(encoded[i])} tokens + max_tokens {req['max_tokens']} "
                                           f"exceed the model's {self.max_model_len}", param="max_tokens").body()
                continue
            params = SamplingParams(n=req["n"], temperature=req["temperature"], top_p=req["top_p"],
                                    max_tokens=req["max_tokens"], seed=req["seed"], stop=req["stops"] or None,
                                    logprobs=req["logprobs"])
            for ids in encoded:
                flat_prompts.append(TokensPrompt(prompt_token_ids=ids))
                flat_params.append(params)
                owners.append((r, len(ids)))
        if flat_prompts:
            outputs = await self._generate(flat_prompts, flat_params)
            for (r, prompt_tokens), output in zip(owners, outputs):
                entry = results[r].setdefault("choices", [])
                results[r]["prompt_tokens"] = results[r].get("prompt_tokens", 0) + prompt_tokens
                entry += [self._choice(s, requests[r]["logprobs"]) for s in output.outputs]
        return results

    def _choice(self, sample, logprobs: int | None) -> dict[str, Any]:
        body = None
        if logprobs is not None:
            tokens, values, top = [], [], []
            for token_id, position in zip(sample.token_ids, sample.logprobs or []):
                tokens.append(self._token_text(token_id, position[token_id]))
                values.append(float(position[token_id].logprob))
                top.append({self._token_text(t, lp): float(lp.logprob) for t, lp in position.items()})
            body = logprobs_body(tokens, values, top if logprobs > 0 else None)
        return {"text": sample.text, "finish_reason": sample.finish_reason or "length", "logprobs": body,
                "num_tokens": len(sample.token_ids)}

    def _token_text(self, token_id: int, logprob) -> str:
        return logprob.decoded_token if logprob.decoded_token is not None else self.tokenizer.decode([token_id])

    async def _generate(self, prompts: list, params) -> list:
        """One engine call under the lock, timed for health; an engine that fails is dead for good
        (its replica answers 503 until Serve restarts it)."""
        async with self.lock:
            if self.failure:
                raise EngineUnavailable(self.failure)
            self.busy_since = time.monotonic()
            call = asyncio.ensure_future(asyncio.to_thread(self.engine.llm.generate, prompts, params, use_tqdm=False))
            try:
                # a call waiting on an engine process that died is never woken: watch for the death
                while not (await asyncio.wait({call}, timeout=0.5))[0]:
                    if engine_dead(self.engine.llm):
                        raise EngineUnavailable("the engine's process died")
                outputs = call.result()
            except (ValueError, TypeError):  # vLLM refusing an input: the engine lives on
                raise
            except Exception as exc:  # noqa: BLE001  (EngineDeadError, its process gone, or anything else)
                self.failure = str(exc) if isinstance(exc, EngineUnavailable) else \
                    f"the engine failed ({type(exc).__name__}: {exc})"
                raise EngineUnavailable(self.failure) from None
            finally:
                self.busy_since = None
            self.last_ok = time.monotonic()
            return outputs

    async def health(self) -> dict[str, float]:
        """Cheap: healthy if an engine call finished within HEALTH_FRESH_S or one is running for less
        than hang_timeout_s; otherwise one real one-token probe, shared by concurrent callers.
        Raises EngineUnavailable for a dead or hung engine."""
        from vllm import SamplingParams

        if not self.failure and engine_dead(self.engine.llm):
            self.failure = "the engine's process died"
        if self.failure:
            raise EngineUnavailable(self.failure)
        now = time.monotonic()
        if self.busy_since is not None:
            busy_s = now - self.busy_since
            if busy_s > self.hang_timeout_s:
                raise EngineUnavailable(f"an engine call has run {busy_s:.0f} s, past {self.hang_timeout_s:g} s: "
                                        "the engine hangs")
            return {"busy_s": round(busy_s, 1)}
        if now - self.last_ok > HEALTH_FRESH_S:
            if self.probe is None or self.probe.done():
                self.probe = asyncio.ensure_future(
                    self._generate(["health"], SamplingParams(max_tokens=1, temperature=0)))
            try:
                await asyncio.wait_for(asyncio.shield(self.probe), self.hang_timeout_s)
            except asyncio.TimeoutError:
                raise EngineUnavailable(f"a one-token probe did not finish within {self.hang_timeout_s:g} s: "
                                        "the engine hangs") from None
        return {"last_generation_s_ago": round(time.monotonic() - self.last_ok, 1)}

    def __del__(self) -> None:
        """Serve's replica shutdown: the engine's processes end with the replica (they outlive it
        otherwise)."""
        import psutil

        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()

    async def check_health(self) -> None:
        """Ray Serve's periodic check: raising (three times in a row) makes Serve restart this replica."""
        await self.health()


def engine_dead(llm) -> bool:
    """Whether vLLM has seen its engine core process die (its client's monitor thread sets the flag;
    False for an in-process engine)."""
    resources = getattr(getattr(llm.llm_engine, "engine_core", None), "resources", None)
    return bool(getattr(resources, "engine_dead", False))


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt; a prompt the tokenizer cannot encode is the client's error (400,
    naming it), never a server error."""
    encoded = []
    for i, prompt in enumerate(prompts):
        try:
            encoded.append(tokenizer(prompt).input_ids)
        except Exception as exc:  # noqa: BLE001  (tokenizers raise a bare Exception for unknown symbols)
            raise ApiError(400, f"prompt {i}: the model's tokenizer cannot encode it ({exc})", param="prompt") from exc
    return encoded


api = FastAPI(title="passn", docs_url=None, redoc_url=None, openapi_url=None)


def _error(exc: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status in (429, 503) else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


@serve.deployment(max_ongoing_requests=64, max_queued_requests=128, ray_actor_options={"num_cpus": 0.1},
                  backpressure_config=BackpressureConfig(status_code=503, retry_after_s=RETRY_AFTER_S))
@serve.ingress(api)
class Gateway:
    """Auth, validation, routing by model id, timeouts and health for the ModelServers."""

    def __init__(self, models: dict[str, Any], token_digest: str | None, limits: dict[str, int],
                 request_timeout_s: float, health_timeout_s: float) -> None:
        self.models, self.digest, self.limits = models, token_digest, Limits(**limits)
        self.request_timeout_s, self.health_timeout_s = request_timeout_s, health_timeout_s
        self.draining, self.in_flight = False, 0
        self.health_cache: dict[str, tuple[float, dict[str, Any]]] = {}  # model id -> (when, report)
        self.health_checks: dict[str, asyncio.Future] = {}  # model id -> the one check in flight

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> JSONResponse:
        self.in_flight += 1
        try:
            if self.draining:
                raise ApiError(503, "the server is shutting down; retry later", code="draining")
            check_bearer(request.headers.get("authorization"), self.digest)
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > MAX_BODY_BYTES:  # refused before it is read
                raise ApiError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes")
            raw = await request.body()
            if len(raw) > MAX_BODY_BYTES:
                raise ApiError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes")
            try:
                body = json.loads(raw)
            except ValueError as exc:
                raise ApiError(400, f"the request body is not JSON: {exc}") from None
            except RecursionError:  # e.g. 100,000 nested arrays: the parser's stack, not the server, gives up
                raise ApiError(400, "the request body nests too deeply to be a completions request") from None
            req = parse_completion_request(body, self.limits, self.models)
            call = {"prompts": req.prompts, "n": req.n, "temperature": req.temperature, "top_p": req.top_p,
                    "max_tokens": req.max_tokens, "seed": req.seed, "stops": req.stops, "logprobs": req.logprobs}
            result = await self._call(self.models[req.model].complete.remote(call), self.request_timeout_s)
            if "error" in result:
                return JSONResponse(result, status_code=400)
            return JSONResponse(completion_body(f"cmpl-{uuid.uuid4().hex}", req.model, result["choices"],
                                                result["prompt_tokens"]))
        except ApiError as exc:
            return _error(exc)
        finally:
            self.in_flight -= 1

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> JSONResponse:
        try:
            check_bearer(request.headers.get("authorization"), self.digest)
        except ApiError as exc:
            return _error(exc)
        return JSONResponse(models_body(sorted(self.models)))

    @api.get("/health")
    async def health(self) -> JSONResponse:
        """Every served model's state (cached HEALTH_CACHE_S, one check per model at a time): 200
        when all are healthy, else 503."""
        if self.draining:
            return _error(ApiError(503, "the server is shutting down", code="draining"))
        ids = sorted(self.models)
        reports = await asyncio.gather(*[self._model_health(model_id) for model_id in ids])
        ok = all(r["ok"] for r in reports)
        return JSONResponse({"status": "ok" if ok else "unavailable", "models": dict(zip(ids, reports))},
                            status_code=200 if ok else 503)

    async def _model_health(self, model_id: str) -> dict[str, Any]:
        cached = self.health_cache.get(model_id)
        if cached and time.monotonic() - cached[0] < HEALTH_CACHE_S:
            return cached[1]
        check = self.health_checks.get(model_id)
        if check is None or check.done():
            check = self.health_checks[model_id] = asyncio.ensure_future(self._check_model(model_id))
        return await asyncio.shield(check)  # a caller that goes away leaves the check to the others

    async def _check_model(self, model_id: str) -> dict[str, Any]:
        try:
            report = {"ok": True, **await self._call(self.models[model_id].health.remote(), self.health_timeout_s)}
        except ApiError as exc:
            report = {"ok": False, "error": exc.message}
        self.health_cache[model_id] = (time.monotonic(), report)
        return report

    async def drain(self) -> int:
        """Stop admitting (new requests get 503 with Retry-After); the completions still running."""
        self.draining = True
        return self.in_flight

    @staticmethod
    async def _call(response, timeout_s: float) -> Any:
        try:
            return await asyncio.wait_for(response, timeout=timeout_s)
        except BackPressureError:
            raise ApiError(503, "the model is overloaded: too many requests queued; retry later", code="overloaded") \
                from None
        except (asyncio.TimeoutError, RequestCancelledError):
            response.cancel()
            raise ApiError(504, f"the request did not finish within {timeout_s:g} s", code="timeout") from None
        except EngineUnavailable as exc:  # raised in the replica: the engine is dead or hangs
            raise ApiError(503, f"the model's engine is unavailable ({exc}); its replica restarts; retry later",
                           code="unavailable") from None
        except (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError):  # the replica was lost
            raise ApiError(503, "the model's replica was lost; it restarts; retry later", code="unavailable") \
                from None


def build_app(models: dict[str, dict[str, Any]], token_digest: str | None, limits: Limits, request_timeout_s: float,
              health_timeout_s: float, max_ongoing: int, max_queued: int, replicas: int, cpus: float, gpus: float):
    """The bound application: ``models`` maps a model id to ModelServer arguments. An engine call
    running past the request timeout (and a margin) counts as a hung engine."""
    servers = {
        model_id: ModelServer.options(name=f"model-{i}", num_replicas=replicas, max_ongoing_requests=max_ongoing,
                                      max_queued_requests=max_queued,
                                      ray_actor_options={"num_cpus": cpus, "num_gpus": gpus,
                                                         "runtime_env": {"env_vars": SERVE_ENGINE_ENV}})
        .bind(model_id=model_id, hang_timeout_s=request_timeout_s + 30, **kwargs)
        for i, (model_id, kwargs) in enumerate(sorted(models.items()))}
    # room for a burst of /health calls (each answered from the cache in a moment) on top of the
    # completions, so that probes never fill the gateway's queue and turn completions away
    return Gateway.options(max_ongoing_requests=2 * max_ongoing * len(models) + HEALTH_BURST,
                           max_queued_requests=2 * max_queued * len(models) + HEALTH_BURST).bind(
        servers, token_digest, dataclasses.asdict(limits), request_timeout_s, health_timeout_s)
