"""A training worker's sampler pool holding the worker's current weights.

What DCOa and Dr. GRPO draw from (``trainer.sampler_client``) and what a chain-of-thought
evaluation samples with (``trainer.evaluation``, ``evaluation.sampler``). The pool lives on the
worker's node (and, on GPU clusters, a share of the worker's own GPU), is created from a folder
of the worker's weights when first needed and torn down with the worker (Ray kills actors with
their owner). Each later version reaches it in memory (``passn.weight_push``: CUDA IPC to engines
on the worker's GPU, broadcast over NCCL to engines on other GPUs; under ZeRO-3 gathered weight by
weight), or through a local folder with
``resources.sampler_weight_push: folder``, bounded by ``resources.sampler_sync_timeout_s``; every
request carries the version it must see, so a pool that missed a push refuses work instead of
sampling a stale policy.

    policy = PolicyPool(cfg, tokenizer, engine, max_model_len, rank, check_prompt)
    policy.ensure(trainer_version)                  # push the weights unless it holds them already
    completions = policy.generate(prompts, samples, temperature, max_new_tokens, seed, names)
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from passn import evaluation
from passn.config import RunConfig
from passn.data import Example
from passn.sampling import engine_kv_cache_bytes, kv_bytes_per_token, one_sequence_kv_cache_bytes
from passn.scratch import scratch_dir
from passn.weight_push import SharedWeights, current_gpu
from trainer.engines import export_weights, named_weights

VLLM_MAX_NUM_SEQS = 1024  # vLLM 0.26's batch on a GPU with >= 70 GiB (256 on smaller ones)


def this_node() -> Any:
    """Ray scheduling pinned to this process's node. Actors a training worker starts are given it
    explicitly: inside a sweep's trial Ray would otherwise place them in the worker's own placement
    group, which the worker fills, and they would never start."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


class PolicyPool:
    def __init__(self, cfg: RunConfig, tokenizer, engine, max_model_len: int, rank: int, check_prompt: str,
                 sleep_between_draws: bool = True) -> None:
        """``engine``: the training engine whose weights the pool samples (its ``module``, exported
        as a Hugging Face folder on every worker at once: ZeRO-3 gathers). ``check_prompt``: the
        prompt whose greedy log-prob, pool against trainer, ``resources.sampler_check_every``
        compares. ``sleep_between_draws``: whether nothing of this worker runs beside a draw, so a
        vLLM engine on the worker's GPU may sleep after it (``resources.sampler_sleep`` decides too)."""
        self.cfg, self.tokenizer, self.engine = cfg, tokenizer, engine
        self.max_model_len, self.rank, self.check_prompt = max_model_len, rank, check_prompt
        self.sleep_between_draws = sleep_between_draws
        self.pool = None
        self.folder = scratch_dir(f"policy-rank{rank}")
        self.origin: Path | None = None  # the folder the pool was created from: a restarted actor loads it
        self.in_memory = cfg.resources.sampler_weight_push != "folder"
        self.shared: SharedWeights | None = None  # the last weights pushed in memory
        self.by_group = False  # pushes broadcast over a process group (set when the pool starts)
        self.syncs = 0
        self.metrics: dict[str, float] = {}

    @property
    def version(self) -> int | None:
        """The trainer version the pool holds (None before it starts)."""
        return None if self.pool is None else self.pool.version

    def ensure(self, trainer_version: int) -> None:
        """The pool holds the trainer's current weights (version ``trainer_version``): it starts
        from a folder, then takes each new version in memory (ZeRO-3: gathered weight by weight), or
        as a folder when asked."""
        if self.pool is not None and self.pool.version == trainer_version:
            return
        started = time.perf_counter()
        r = self.cfg.resources
        if self.pool is None:
            self._start(trainer_version)
        elif self.in_memory:
            shared = SharedWeights.of(named_weights(self.engine, self.cfg), self.engine_dtype(), by_group=self.by_group)
            self.pool.load_weights(shared, trainer_version, timeout_s=r.sampler_sync_timeout_s)
            self.shared = shared  # kept until the next push: a restarted actor loads it
            if shared.cuda:
                torch.cuda.ipc_collect()  # the previous push's copies, released by the engines
            self._add("push_mb", shared.nbytes / 2**20)
            if self.by_group:
                self.metrics["push_broadcast"] = 1.0  # over a process group, not by handles
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
            for key, gap in zip(("sync_logp_gap", "sync_logp_gap_per_token"), self.sync_gap()):
                self.metrics[key] = max(self.metrics.get(key, 0.0), gap)

    def generate(self, prompts: Sequence[str], samples: int, temperature: float, max_new_tokens: int, seed: int,
                 names: Sequence[str]):
        """``samples`` completions of each prompt from the version the pool holds (``ensure``
        first). A prompt the pool skips (too long for the model) is an error naming it by ``names``."""
        completions, skipped = self.pool.generate(prompts, samples, temperature, max_new_tokens, seed=seed)
        if skipped:
            s = skipped[0]
            raise ValueError(f"{names[s.prompt_index]}: {s.reason}; lower sampling.max_new_tokens or raise the "
                             "model's max_position_embeddings")
        return completions

    def engine_dtype(self) -> torch.dtype:
        """The sampler engines' dtype: model.dtype, or (auto) the dtype of the folder they started from."""
        named = {"float32": torch.float32, "bfloat16": torch.bfloat16}
        return named.get(self.cfg.model.dtype) or next(self.engine.module.parameters()).dtype

    def _start(self, trainer_version: int) -> None:
        import ray

        from actors.sampler import SamplerPool

        target = self.folder / f"v{trainer_version}"
        export_weights(self.engine, self.tokenizer, self.cfg, str(target))
        r = self.cfg.resources
        # on a GPU shared with this trainer a vLLM engine sleeps between draws (its KV cache freed,
        # its weights in host memory) only when nothing runs beside the draw: vLLM's sleep asserts
        # that the device's free memory did not shrink meanwhile, which a trainer stepping beside a
        # background draw (staleness 1), or another trial on the same GPU, would break (docs/ONLINE.md)
        shared_gpu = r.sampler_gpu_fraction > 0 and torch.cuda.is_available()
        sleep = shared_gpu and (r.sampler_backend == "transformers" or (r.sampler_sleep and self.sleep_between_draws))
        self.pool = SamplerPool(
            str(target), num_actors=r.sampler_actors, backend=r.sampler_backend, max_model_len=self.max_model_len,
            kv_cache_bytes=self.kv_cache_bytes(), dtype=self.cfg.model.dtype,
            seed=self.cfg.sampling.seed + self.rank, cpus_per_actor=r.sampler_cpus,
            gpus_per_actor=r.sampler_gpu_fraction, version=trainer_version, scheduling_strategy=this_node(),
            sleep_when_idle=sleep, unit_timeout_s=r.sampler_unit_timeout_s, start_timeout_s=r.sampler_sync_timeout_s,
            # this worker's own GPU (Ray's ids: physical), whose share it asked for with the samplers'
            gpu_ids=[str(i) for i in ray.get_gpu_ids()] if self.cfg.samplers_share_worker_gpu() else None)
        self.origin = target
        self.by_group = self.sends_by_group()

    def sends_by_group(self) -> bool:
        """Whether pushes in memory are broadcast over a process group: when asked
        (``resources.sampler_weight_push: broadcast``; gloo where an engine shares this worker's
        GPU or on the CPU), and by default when an engine runs on another GPU than this worker's,
        whose memory it cannot map."""
        mode = self.cfg.resources.sampler_weight_push
        if mode != "auto" or not torch.cuda.is_available():
            return mode == "broadcast"
        here = current_gpu()
        return any(uuid not in (None, here) for uuid in self.pool.gpu_uuids())

    def kv_cache_bytes(self) -> int:
        """vLLM's KV cache per sampler actor: resources.sampler_kv_cache_mb, or (unset) 64 MiB on
        the CPU (at least one sequence of the model's length) and, on a GPU, room for the engine's
        whole batch within its share of the GPU."""
        r = self.cfg.resources
        if r.sampler_kv_cache_mb is not None:
            return r.sampler_kv_cache_mb << 20
        width = torch.empty((), dtype=self.engine_dtype()).element_size()
        if not (r.sampler_gpu_fraction > 0 and torch.cuda.is_available()):  # and one sequence of the model's length
            return max(64 << 20, one_sequence_kv_cache_bytes(kv_bytes_per_token(self.engine.module.config, width),
                                                             self.max_model_len))
        weights = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in self.engine.module.parameters())
        return engine_kv_cache_bytes(kv_bytes_per_token(self.engine.module.config, width), self.max_model_len,
                                     VLLM_MAX_NUM_SEQS, int(r.sampler_gpu_fraction * torch.cuda.mem_get_info()[1]),
                                     weights * width)

    def sync_gap(self) -> tuple[float, float]:
        """|log p| of the pool's greedy completion of the check prompt, pool against trainer: summed
        over its tokens, and that sum over their number."""
        (greedy,), _ = self.pool.generate([self.check_prompt], 1, 0.0, self.cfg.sampling.max_new_tokens, seed=0)
        ids = self.tokenizer(self.check_prompt).input_ids
        example = Example("sync-check", tuple(ids) + tuple(greedy.token_ids), len(ids))
        with torch.no_grad():
            trainer = float(evaluation.sequence_logprobs(self.engine.module, [example], self.tokenizer.pad_token_id)[0])
        gap = abs(trainer - greedy.cumulative_logprob)
        return gap, gap / max(1, len(greedy.token_ids))

    def _add(self, key: str, value: float) -> None:
        self.metrics[key] = self.metrics.get(key, 0.0) + value

    def take_metrics(self, busy: bool = False) -> dict[str, float]:
        """The pushes' numbers since the last call, and the pool's version and GPU peak (not while
        ``busy`` with a background draw: a state() call would queue behind it)."""
        out, self.metrics = self.metrics, {}
        if self.pool is not None:
            out["pool_version"] = self.pool.version
            if self.cfg.resources.sampler_gpu_fraction > 0 and not busy:
                out["sampler_gpu_peak_gb"] = max(self.pool.gpu_peak_bytes() or [0]) / 2**30
        return out

    def close(self) -> None:
        """The pool's actors ended (a draw running on them ends at once) and its folders removed."""
        if self.pool is not None:
            self.pool.shutdown()
        shutil.rmtree(self.folder, ignore_errors=True)
