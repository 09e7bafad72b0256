"""Sampling from any OpenAI-compatible completions server (``passn serve``, vLLM's own server, ...)
through the official ``openai`` client, with the SamplerPool's interface.

    sampler = EndpointSampler("http://head:8000/v1", model="ce/step_00000468", api_key=token)
    completions, skipped = sampler.generate(prompts, samples_per_prompt=256, temperature=1.0,
                                            max_new_tokens=16, seed=0)

Large n is split into requests of at most ``max_n`` samples, one prompt each, seeded as the pool
seeds its vLLM engines (``passn.sampling.prompt_seed``: the server gives sample j of a request seeded
s the seed s + j, so no two samples share a stream); requests run ``concurrency`` at a time; 429/5xx
answers and lost connections are retried with backoff (honouring Retry-After) until the request's
deadline ``timeout_s``, which bounds all its tries together: past it, :class:`DeadlinePassed`. A
prompt the server refuses as invalid (400, for example longer than the model allows) is skipped with
the server's message; any other error stops.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from passn.deadlines import DeadlinePassed
from passn.sampling import Completion, Skipped, Work, plan_work, prompt_seed


class EndpointSampler:
    def __init__(self, base_url: str, model: str, api_key: str | None = None, max_n: int = 256,
                 concurrency: int = 8, timeout_s: float = 600.0) -> None:
        import openai

        # retries are ours (within the request's deadline), not the client's (each try its own timeout)
        self.client = openai.OpenAI(base_url=base_url.rstrip("/"), api_key=api_key or "EMPTY", max_retries=0)
        self.base_url, self.timeout_s = base_url, timeout_s
        self.model, self.max_n, self.concurrency = model, max_n, concurrency
        served = [m.id for m in self._within_deadline("GET /models", lambda c: c.models.list(), first=True).data]
        if model not in served:
            raise ValueError(f"{base_url}: model {model!r} is not served there (served: {', '.join(served) or 'none'})")

    def generate(self, prompts: Sequence[str], samples_per_prompt: int, temperature: float, max_new_tokens: int,
                 seed: int = 0) -> tuple[list[Completion], list[Skipped]]:
        if temperature == 0 and samples_per_prompt != 1:
            raise ValueError("greedy decoding (temperature 0) gives one completion per prompt")
        units = plan_work(len(prompts), samples_per_prompt, self.max_n, prompts_per_unit=1)
        with ThreadPoolExecutor(self.concurrency) as pool:
            results = list(pool.map(lambda u: self._request(prompts[u.prompt_indices[0]], u, temperature,
                                                            max_new_tokens, seed), units))
        completions = [c for done, _ in results for c in done]
        skipped = {s.prompt_index: s for _, skip in results for s in skip}
        completions.sort(key=lambda c: (c.prompt_index, c.sample_index))
        return completions, sorted(skipped.values(), key=lambda s: s.prompt_index)

    def _request(self, prompt: str, unit: Work, temperature: float, max_new_tokens: int,
                 seed: int) -> tuple[list[Completion], list[Skipped]]:
        import openai

        index = unit.prompt_indices[0]
        try:
            out = self._within_deadline(f"a completions request (prompt {index})", lambda c: c.completions.create(
                model=self.model, prompt=prompt, n=unit.samples, temperature=temperature, max_tokens=max_new_tokens,
                seed=None if temperature == 0 else prompt_seed(seed, index, unit.first_sample), logprobs=1))
        except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
            return [], [Skipped(index, f"refused by the server: {exc.message}")]
        completions = []
        for j, choice in enumerate(sorted(out.choices, key=lambda c: c.index)):
            values = choice.logprobs.token_logprobs if choice.logprobs else None
            completions.append(Completion(
                prompt_index=index, sample_index=unit.first_sample + j, text=choice.text, token_ids=(),
                cumulative_logprob=math.fsum(v for v in values if v is not None) if values else math.nan,
                num_tokens=len(values) if values else 0, finish_reason=str(choice.finish_reason)))
        if len(completions) != unit.samples:
            raise RuntimeError(f"the server returned {len(completions)} completions for n={unit.samples}")
        return completions, []

    def _within_deadline(self, what: str, call: Callable, first: bool = False):
        """``call(client)``, tried again after a 429/5xx answer or a lost connection (after the
        server's Retry-After, else a backoff of 0.5, 1, 2, ... 8 s) while the deadline allows.
        ``first``: the first contact, where a refused connection means nothing listens (raised at once)."""
        import openai

        deadline, tries = time.monotonic() + self.timeout_s, 0
        while True:
            left = deadline - time.monotonic()
            try:
                return call(self.client.with_options(timeout=max(left, 0.001)))
            except openai.APITimeoutError:
                raise DeadlinePassed(f"{self.base_url}: {what}", self.timeout_s) from None
            except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as exc:
                response = getattr(exc, "response", None)
                if first and response is None:
                    raise  # nothing listens there: the caller names the address
                after = response.headers.get("retry-after", "") if response is not None else ""
                pause = float(after) if after.replace(".", "", 1).isdigit() else min(0.5 * 2 ** tries, 8.0)
                if time.monotonic() + pause >= deadline:
                    raise DeadlinePassed(f"{self.base_url}: {what} (last: {exc})", self.timeout_s) from None
                time.sleep(pause)
                tries += 1

    def shutdown(self) -> None:
        self.client.close()
