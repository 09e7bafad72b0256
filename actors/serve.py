"""The Ray Serve application behind `passn serve`: an OpenAI-compatible completions API over trained
checkpoints.

    Gateway (ingress, FastAPI)  -- auth, validation, routing by model id, timeouts, /health
      └─ ModelServer per checkpoint  -- one in-process vLLM engine, requests batched by serve.batch

Thin by design: parsing, limits and response bodies live in ``passn.openai_api``. Backpressure is
Serve's own: both deployments have ``max_ongoing_requests`` and ``max_queued_requests``; a full
gateway queue is answered 503 by Serve's proxy, a full model queue 503 by the gateway, each with
``Retry-After``. A request that runs past the timeout is cancelled and answered 504.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError, RequestCancelledError

from actors.sampler import ENGINE_ENV, VLLMEngine
from passn.openai_api import (ApiError, Limits, check_bearer, completion_body, logprobs_body, models_body,
                              parse_completion_request)

MAX_BODY_BYTES = 4 << 20
RETRY_AFTER_S = 1


@serve.deployment(max_ongoing_requests=32, max_queued_requests=64, ray_actor_options={"num_cpus": 0.5})
class ModelServer:
    """One checkpoint in one vLLM engine; concurrent requests are batched into one engine call."""

    def __init__(self, model_id: str, model_dir: str, max_model_len: int, kv_cache_bytes: int, dtype: str,
                 max_batch_size: int) -> None:
        from passn.models import fetch_model_folder

        os.environ.update(ENGINE_ENV)
        self.model_id, self.max_model_len = model_id, max_model_len
        self.engine = VLLMEngine(fetch_model_folder(model_dir), max_model_len, kv_cache_bytes, dtype, seed=0)
        self.tokenizer = self.engine.tokenizer
        self.lock = asyncio.Lock()  # one engine call at a time (batches and health probes)
        self.complete.set_max_batch_size(max_batch_size)

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
            async with self.lock:
                outputs = await asyncio.to_thread(self.engine.llm.generate, flat_prompts, flat_params, use_tqdm=False)
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

    async def health(self) -> float:
        """Seconds one real (greedy, one-token) generation takes."""
        from vllm import SamplingParams

        start = time.perf_counter()
        async with self.lock:
            await asyncio.to_thread(self.engine.llm.generate, ["health"], SamplingParams(max_tokens=1, temperature=0),
                                    use_tqdm=False)
        return time.perf_counter() - start


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

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> JSONResponse:
        try:
            check_bearer(request.headers.get("authorization"), self.digest)
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

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> JSONResponse:
        try:
            check_bearer(request.headers.get("authorization"), self.digest)
        except ApiError as exc:
            return _error(exc)
        return JSONResponse(models_body(sorted(self.models)))

    @api.get("/health")
    async def health(self) -> JSONResponse:
        """A bounded real generation on every served model: 200 when all answer in time, else 503."""
        report, ok = {}, True
        for model_id, handle in sorted(self.models.items()):
            try:
                seconds = await self._call(handle.health.remote(), self.health_timeout_s)
                report[model_id] = {"ok": True, "generation_ms": round(seconds * 1e3, 1)}
            except ApiError as exc:
                ok = False
                report[model_id] = {"ok": False, "error": exc.message}
        return JSONResponse({"status": "ok" if ok else "unavailable", "models": report}, status_code=200 if ok else 503)

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


def build_app(models: dict[str, dict[str, Any]], token_digest: str | None, limits: Limits, request_timeout_s: float,
              health_timeout_s: float, max_ongoing: int, max_queued: int, replicas: int, cpus: float, gpus: float):
    """The bound application: ``models`` maps a model id to ModelServer arguments."""
    servers = {
        model_id: ModelServer.options(name=f"model-{i}", num_replicas=replicas, max_ongoing_requests=max_ongoing,
                                      max_queued_requests=max_queued,
                                      ray_actor_options={"num_cpus": cpus, "num_gpus": gpus,
                                                         "runtime_env": {"env_vars": ENGINE_ENV}})
        .bind(model_id=model_id, **kwargs)
        for i, (model_id, kwargs) in enumerate(sorted(models.items()))}
    return Gateway.options(max_ongoing_requests=2 * max_ongoing * len(models),
                           max_queued_requests=2 * max_queued * len(models)).bind(
        servers, token_digest, dataclasses.asdict(limits), request_timeout_s, health_timeout_s)
