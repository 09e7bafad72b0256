"""The policy's own samples during training (DCOa, Dr. GRPO).

Each training worker owns a :class:`actors.sampler.SamplerPool` on its own node (and, on GPU
clusters, a fraction of its own GPU), created when it first needs samples and torn down with the
worker (Ray kills actors with their owner). The pool starts from a folder of the worker's weights;
before it samples for trainer version v, the worker pushes its current weights in memory
(``passn.weight_push``: CUDA IPC on a GPU; under ZeRO-3, or with ``resources.sampler_weight_push:
folder``, a local folder), bounded by ``resources.sampler_sync_timeout_s``; every request carries
the version it must see, so a pool that missed a sync refuses work instead of sampling a stale policy.

The candidates of a step are split over the workers; each samples its share with its own pool,
and the results are all-gathered, so every worker holds the same Monte Carlo cache and takes the
same keep/drop decisions. With ``objective.staleness: 1`` a worker's pool samples the next
step's candidates in a background thread while the worker trains the current step.

It is the :class:`passn.batches.Sampler` that DCOa's and Dr. GRPO's batch sources read:

    online = OnlineSampler(cfg, task, problems, tokenizer, engine, limit, collective)
    estimates = online.estimates(window, trainer_version=step)   # DCOa: p_MC per candidate
    groups = online.groups(window, trainer_version=step)         # Dr. GRPO: G rollouts per prompt
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from passn import evaluation
from passn.collective import Collective
from passn.config import RunConfig
from passn.data import Example
from passn.online import Estimate, MonteCarloCache, Rollout
from passn.sampling import engine_kv_cache_bytes, group_by_prompt, kv_bytes_per_token, one_sequence_kv_cache_bytes
from passn.scratch import scratch_dir
from passn.weight_push import SharedWeights
from trainer.engines import export_weights, named_weights

VLLM_MAX_NUM_SEQS = 1024  # vLLM 0.26's batch on a GPU with >= 70 GiB (256 on smaller ones)

# one draw: example index -> [(completion token ids, verified correct)]
Draw = dict[int, list[tuple[tuple[int, ...], bool]]]


def this_node() -> Any:
    """Ray scheduling pinned to this process's node. Actors a training worker starts are given it
    explicitly: inside a sweep's trial Ray would otherwise place them in the worker's own placement
    group, which the worker fills, and they would never start."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def answer_checker(cfg: RunConfig):
    """A training worker's answer checker for a MATH-format task: math-verify on a Ray actor on the
    worker's node, one cache, each batch of checks bounded by resources.sampler_unit_timeout_s."""
    from actors.verifier import VerifierPool

    return VerifierPool(mode=cfg.task.answer_check, scheduling_strategy=this_node(),
                        call_timeout_s=cfg.resources.sampler_unit_timeout_s)


class OnlineSampler:
    def __init__(self, cfg: RunConfig, task, problems: Sequence, tokenizer, engine, max_model_len: int,
                 collective: Collective) -> None:
        """``engine``: the training engine whose weights the pool samples (its ``module``, exported
        as a Hugging Face folder on every worker at once: ZeRO-3 gathers)."""
        self.cfg, self.task, self.problems, self.tokenizer = cfg, task, problems, tokenizer
        self.engine, self.max_model_len, self.collective = engine, max_model_len, collective
        self.rank, self.world, self.gather = collective.rank, collective.world, collective.gather
        self.kind = cfg.objective.kind
        self.samples = cfg.objective.mc_samples if self.kind == "dcoa" else cfg.objective.group_size
        self.staleness = cfg.objective.staleness
        self.cache = MonteCarloCache()  # dcoa
        self.rollouts: dict[int, list[Rollout]] = {}  # dr_grpo
        self.pool = self.verifier = None
        self.folder = scratch_dir(f"policy-rank{self.rank}")
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="passn-prefetch")
        self.pending: tuple[Future, int] | None = None  # a background draw and its policy version
        self.origin: Path | None = None  # the folder the pool was created from: a restarted actor loads it
        self.in_memory = cfg.resources.sampler_weight_push != "folder"
        self.shared: SharedWeights | None = None  # the last weights pushed in memory
        self.syncs = 0
        self.metrics: dict[str, float] = {}

    # -- the pool and its weights ------------------------------------------------------------------
    def _ensure(self, trainer_version: int) -> None:
        """The pool holds the trainer's current weights (version ``trainer_version``): it starts
        from a folder, then takes each new version in memory (ZeRO-3: gathered weight by weight), or
        as a folder when asked."""
        if self.pool is not None and self.pool.version == trainer_version:
            return
        started = time.perf_counter()
        r = self.cfg.resources
        if self.pool is None:
            self._start_pool(trainer_version)
        elif self.in_memory:
            shared = SharedWeights.of(named_weights(self.engine, self.cfg), self._engine_dtype())
            self.pool.load_weights(shared, trainer_version, timeout_s=r.sampler_sync_timeout_s)
            self.shared = shared  # kept until the next push: a restarted actor loads it
            if shared.cuda:
                torch.cuda.ipc_collect()  # the previous push's copies, released by the engines
            self._add("push_mb", shared.nbytes / 2**20)
        else:
            target = self.folder / f"v{trainer_version}"
            export_weights(self.engine, self.tokenizer, self.cfg, str(target))
            previous = self.pool.source
            self.pool.load_weights(str(target), trainer_version, timeout_s=r.sampler_sync_timeout_s)
            if isinstance(previous, str) and Path(previous) != self.origin:  # a restarted actor starts from the origin
                shutil.rmtree(previous, ignore_errors=True)
        self.syncs += 1
        self._add("sync_s", time.perf_counter() - started)
        self._add("syncs", 1)
        if r.sampler_check_every and self.syncs % r.sampler_check_every == 0:
            for key, gap in zip(("sync_logp_gap", "sync_logp_gap_per_token"), self._sync_gap()):
                self.metrics[key] = max(self.metrics.get(key, 0.0), gap)

    def _engine_dtype(self) -> torch.dtype:
        """The sampler engines' dtype: model.dtype, or (auto) the dtype of the folder they started from."""
        named = {"float32": torch.float32, "bfloat16": torch.bfloat16}
        return named.get(self.cfg.model.dtype) or next(self.engine.module.parameters()).dtype

    def _start_pool(self, trainer_version: int) -> None:
        import ray

        from actors.sampler import SamplerPool
        from passn.tasks import MathTask

        target = self.folder / f"v{trainer_version}"
        export_weights(self.engine, self.tokenizer, self.cfg, str(target))
        r = self.cfg.resources
        here = this_node()
        if isinstance(self.task, MathTask):  # math-verify on Ray actors, bounded, one cache per worker
            self.verifier = answer_checker(self.cfg)
        # on a GPU shared with this trainer a vLLM engine sleeps between draws (its KV cache freed,
        # its weights in host memory) only when nothing runs beside the draw: vLLM's sleep asserts
        # that the device's free memory did not shrink meanwhile, which a trainer stepping beside a
        # background draw (staleness 1) would break (docs/ONLINE.md)
        shared_gpu = r.sampler_gpu_fraction > 0 and torch.cuda.is_available()
        self.pool = SamplerPool(
            str(target), num_actors=r.sampler_actors, backend=r.sampler_backend, max_model_len=self.max_model_len,
            kv_cache_bytes=self._kv_cache_bytes(), dtype=self.cfg.model.dtype,
            seed=self.cfg.sampling.seed + self.rank, cpus_per_actor=r.sampler_cpus,
            gpus_per_actor=r.sampler_gpu_fraction, version=trainer_version, scheduling_strategy=here,
            sleep_when_idle=shared_gpu and (r.sampler_backend == "transformers" or self.staleness == 0),
            unit_timeout_s=r.sampler_unit_timeout_s,
            start_timeout_s=r.sampler_sync_timeout_s,
            # this worker's own GPU (Ray's ids: physical), whose share it asked for with the samplers'
            gpu_ids=[str(i) for i in ray.get_gpu_ids()] if self.cfg.samplers_share_worker_gpu() else None)
        self.origin = target

    def _kv_cache_bytes(self) -> int:
        """vLLM's KV cache per sampler actor: resources.sampler_kv_cache_mb, or (unset) 64 MiB on
        the CPU (at least one sequence of the model's length) and, on a GPU, room for the engine's whole batch within its share of the GPU."""
        r = self.cfg.resources
        if r.sampler_kv_cache_mb is not None:
            return r.sampler_kv_cache_mb << 20
        width = torch.empty((), dtype=self._engine_dtype()).element_size()
        if not (r.sampler_gpu_fraction > 0 and torch.cuda.is_available()):  # and one sequence of the model's length
            return max(64 << 20, one_sequence_kv_cache_bytes(kv_bytes_per_token(self.engine.module.config, width),
                                                             self.max_model_len))
        weights = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in self.engine.module.parameters())
        return engine_kv_cache_bytes(kv_bytes_per_token(self.engine.module.config, width), self.max_model_len,
                                     VLLM_MAX_NUM_SEQS, int(r.sampler_gpu_fraction * torch.cuda.mem_get_info()[1]),
                                     weights * width)

    def _sync_gap(self) -> tuple[float, float]:
        """|log p| of the pool's greedy completion of a fixed prompt, pool against trainer: summed
        over its tokens, and that sum over their number."""
        prompt = self.task.prompt(self.problems[0])
        (greedy,), _ = self.pool.generate([prompt], 1, 0.0, self.cfg.sampling.max_new_tokens, seed=0)
        ids = self.tokenizer(prompt).input_ids
        example = Example("sync-check", tuple(ids) + tuple(greedy.token_ids), len(ids))
        with torch.no_grad():
            trainer = float(evaluation.sequence_logprobs(self.engine.module, [example], self.tokenizer.pad_token_id)[0])
        gap = abs(trainer - greedy.cumulative_logprob)
        return gap, gap / max(1, len(greedy.token_ids))

    # -- drawing samples ---------------------------------------------------------------------------
    def _draw(self, indices: Sequence[int], version: int) -> tuple[Draw, float, int]:
        """``self.samples`` completions of each prompt, verified: (draw, seconds, tokens)."""
        started = time.perf_counter()
        if not indices:
            return {}, 0.0, 0
        problems = [self.problems[i] for i in indices]
        prompts = [self.task.prompt(p) for p in problems]
        # a function of what is drawn, not of how many draws came before: a resumed run draws the same
        seed = self.cfg.sampling.seed + 1_000_003 * version + 7919 * self.rank + indices[0]
        completions, skipped = self.pool.generate(prompts, self.samples, self.cfg.sampling.temperature,
                                                  self.cfg.sampling.max_new_tokens, seed=seed)
        if skipped:
            s = skipped[0]
            raise ValueError(f"training example {problems[s.prompt_index].uid}: {s.reason}; lower "
                             "sampling.max_new_tokens or raise the model's max_position_embeddings")
        groups = group_by_prompt(completions, len(prompts))
        texts = [c.text for g in groups for c in g]
        references = [p for p, g in zip(problems, groups) for _ in g]
        if self.verifier is not None:
            verdicts = self.verifier.check_many([(self.task.extract(t), p.answer) for p, t in zip(references, texts)])
        else:  # the synthetic task: an exact comparison in this process
            verdicts = self.task.check_many(references, texts)
        draw: Draw = {}
        position = 0
        for index, group in zip(indices, groups):
            draw[index] = [(c.token_ids, verdicts[position + j].correct) for j, c in enumerate(group)]
            position += len(group)
        return draw, time.perf_counter() - started, sum(c.num_tokens for c in completions)

    def _merge(self, local: tuple[Draw, float, int] | str, version: int, overlapped: bool) -> None:
        """All workers' shares of one draw into every worker's cache. ``local`` is this worker's
        share, or its error message: an error on one worker is raised on every worker, so none
        waits in a collective for one that has failed."""
        parts = self.gather(local)
        errors = [f"worker {rank}: {part}" for rank, part in enumerate(parts) if isinstance(part, str)]
        if errors:
            raise RuntimeError("online sampling failed on " + "; ".join(errors))
        for draw, _, _ in parts:
            for index, samples in draw.items():
                if self.kind == "dcoa":
                    self.cache.put(index, sum(ok for _, ok in samples), len(samples), version)
                else:
                    self.rollouts[index] = [Rollout(t, float(ok), version) for t, ok in samples]
        self._add("sample_overlapped_s" if overlapped else "sample_s", max(seconds for _, seconds, _ in parts))
        self._add("sampled_tokens", sum(tokens for _, _, tokens in parts))

    def _collect_prefetch(self) -> None:
        if self.pending is not None:
            future, version = self.pending
            self.pending = None
            self._merge(_outcome(future.result), version, overlapped=True)

    settle = _collect_prefetch  # before a checkpoint: the background draw joins the cache

    def _fresh(self, indices: Sequence[int], trainer_version: int) -> list[int]:
        if self.kind == "dcoa":
            ok = self.cache.usable(indices, trainer_version, self.staleness)
        else:
            ok = {i for i in indices if i in self.rollouts
                  and 0 <= trainer_version - self.rollouts[i][0].version <= self.staleness}
        return [i for i in dict.fromkeys(indices) if i not in ok]

    def _fill(self, indices: Sequence[int], trainer_version: int) -> None:
        self._collect_prefetch()
        need = self._fresh(indices, trainer_version)  # the same on every worker: the caches are equal
        if need:
            def draw():  # a draw the trainer waits for uses its current weights, whatever the staleness
                self._ensure(trainer_version)
                return self._draw(need[self.rank :: self.world], self.pool.version)

            local = _outcome(draw)
            self._merge(local, trainer_version if isinstance(local, str) else self.pool.version, overlapped=False)

    def estimates(self, indices: Sequence[int], trainer_version: int) -> list[Estimate]:
        """DCOa: p_MC of each candidate from samples at most ``staleness`` versions old."""
        self._fill(indices, trainer_version)
        return [self.cache.entries[i] for i in indices]

    def groups(self, indices: Sequence[int], trainer_version: int) -> list[list[Rollout]]:
        """Dr. GRPO: G verified rollouts per prompt."""
        self._fill(indices, trainer_version)
        return [self.rollouts[i] for i in indices]

    def prefetch(self, indices: Sequence[int], trainer_version: int) -> None:
        """With staleness 1: sample the next step's candidates in the background, with the weights
        of version ``trainer_version`` (used at ``trainer_version + 1``, one version behind)."""
        if self.staleness == 0:
            return
        need = self._fresh(indices, trainer_version + 1)
        if not need:
            return
        assert self.pending is None, "a prefetch is already running"
        error = _outcome(lambda: self._ensure(trainer_version))
        if isinstance(error, str):  # reported by every worker at the next collect
            failed: Future = Future()
            failed.set_exception(RuntimeError(error))
            self.pending = (failed, trainer_version)
            return
        version = self.pool.version
        self.pending = (self.executor.submit(self._draw, need[self.rank :: self.world], version), version)

    def forget(self, trainer_version: int) -> None:
        """Drop samples too old to be used at ``trainer_version`` or later."""
        self.cache.prune(trainer_version, self.staleness)
        self.rollouts = {i: g for i, g in self.rollouts.items() if trainer_version - g[0].version <= self.staleness}

    # -- metrics, checkpoint state -----------------------------------------------------------------
    def _add(self, key: str, value: float) -> None:
        self.metrics[key] = self.metrics.get(key, 0.0) + value

    def take_metrics(self) -> dict[str, float]:
        out, self.metrics = self.metrics, {}
        if self.pool is not None:
            out["pool_version"] = self.pool.version
            if self.cfg.resources.sampler_gpu_fraction > 0 and self.pending is None:  # (a state() call would queue behind the prefetch)
                out["sampler_gpu_peak_gb"] = max(self.pool.gpu_peak_bytes() or [0]) / 2**30
        return out

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (call ``settle`` first, on every worker)."""
        return {"p_mc_cache": self.cache.to_json(),
                "rollouts": {str(i): [[list(r.token_ids), r.reward, r.version] for r in g] for i, g in self.rollouts.items()},
                "pool_version": None if self.pool is None else self.pool.version}

    def load_state(self, state: dict[str, Any]) -> None:
        """The samples of a checkpoint; the pool is created from the resumed weights, tagged with
        the resumed step, before its first sample (``pool_version`` is informational)."""
        self.cache = MonteCarloCache.from_json(state["p_mc_cache"])
        self.rollouts = {int(i): [Rollout(tuple(t), reward, version) for t, reward, version in g]
                         for i, g in state.get("rollouts", {}).items()}

    def close(self) -> None:
        for pool in (self.pool, self.verifier):  # first: a running background draw then ends at once
            if pool is not None:
                pool.shutdown()
        self.executor.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.folder, ignore_errors=True)


def _outcome(fn: Callable[[], Any]) -> Any:
    """``fn()``, or its error as a message (to be all-gathered rather than raised on one worker)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
