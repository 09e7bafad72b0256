"""Training engines behind one small interface: DeepSpeed (default) or torch DDP.

    engine = make_engine(model, cfg, micro_batches, device)
    logits = engine.forward(input_ids=..., attention_mask=...).logits
    engine.backward_and_step(loss)      # the optimizer steps once every ``micro_batches`` calls
    engine.save_state(dir); engine.load_state(dir)
"""

from __future__ import annotations

import importlib
import pickle
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from passn import checkpoint as ckpt
from passn.config import RunConfig
from passn.models import write_model_folder


def _lr_lambda(warmup_steps: int):
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def skip_shared_memory_all_reduce() -> None:
    """Keep DeepSpeed from JIT-building its CPU shared-memory all-reduce op at start-up.

    That op serves only DeepSpeed's inference all-reduce, never training; building it takes a file
    lock under TORCH_EXTENSIONS_DIR that waits without end, so a worker killed while holding it
    (a fault, a preemption, Ctrl-C during the first minute-long build) left every later trainer
    start on the machine waiting forever. Not built, nothing waits, and a first start is ~1 min faster.
    """
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False  # DeepSpeed's own probe cache


def load_training_state(path: str, map_location=None, allowed: Sequence[str] = ckpt.TRAINING_STATE_GLOBALS):
    """A ``torch.save`` file of training state, unpickled by torch's weights-only unpickler with
    just ``allowed`` added (for this load only): tensors, plain containers and those classes; a
    file that names anything else is a CheckpointError naming it, and nothing of it runs."""
    classes = []
    for name in allowed:
        module, _, attr = name.rpartition(".")
        classes.append(getattr(importlib.import_module(module), attr))
    try:
        with torch.serialization.safe_globals(classes):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message advises weights_only=False, precisely what must not be done here: keep the name only
        named = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
        raise ckpt.CheckpointError(ckpt.refusal(path, [named.group(1)] if named else "objects other than tensors")) from None


class WeightsOnlyLoads:
    """DeepSpeed's checkpoint engine with every load (the module state, the optimizer and its ZeRO
    shards all go through ``checkpoint_engine.load``) done by :func:`load_training_state`; saving
    and everything else stay DeepSpeed's own."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def load(self, path: str, map_location=None):
        return load_training_state(path, map_location)


class DeepSpeedEngine:
    def __init__(self, model, cfg: RunConfig, micro_batches: int, device: torch.device) -> None:
        import deepspeed

        if device.type == "cpu":  # (DeepSpeed's CUDA accelerator has no such op)
            skip_shared_memory_all_reduce()
        o = cfg.optim
        # a torch optimizer (not DeepSpeed's own) avoids building DeepSpeed's CPU Adam op on CPU;
        # on CUDA the fused kernel is what DeepSpeed's FusedAdam would run
        optimizer = torch.optim.AdamW(model.parameters(), lr=o.learning_rate, betas=o.betas,
                                      weight_decay=o.weight_decay, eps=1e-8, fused=device.type == "cuda")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(o.warmup_steps))
        low_precision = device.type == "cuda" and cfg.model.dtype != "float32"
        autocast = low_precision and cfg.resources.mixed_precision == "torch_autocast"
        bf16 = low_precision and not autocast
        import torch.distributed as dist

        self.zero_stage = cfg.resources.zero_stage
        if self.zero_stage == 2 and dist.is_initialized() and dist.get_world_size() == 1:
            # one rank: stage 2's gradient partitioning divides nothing but costs its bucketing
            # (measured 0.83x against 0.97x for stage 1 on an H200, 1B model); same numerics
            self.zero_stage = 1
        zero: dict[str, Any] = {"stage": self.zero_stage}
        if self.zero_stage >= 2:
            # large buckets and contiguous gradients: fewer, bigger reduce-scatters
            zero.update(overlap_comm=device.type == "cuda", contiguous_gradients=True,
                        reduce_bucket_size=int(5e8), allgather_bucket_size=int(5e8))
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,  # passn forms micro-batches itself
            "gradient_accumulation_steps": micro_batches,
            "zero_optimization": zero,
            "gradient_clipping": o.max_grad_norm,
            "bf16": {"enabled": bf16},
            # bf16 gradients accumulate into fp32 (across micro-batches and ranks' buckets); at
            # stage 1 DeepSpeed then steps with its BF16_Optimizer, whose inf/nan check reuses the
            # gradient norm instead of scanning every gradient with a host sync. On an H200 (1B
            # model) passn's step went from 0.94x to 1.01x of a plain PyTorch loop (README).
            **({"data_types": {"grad_accum_dtype": "fp32"}} if bf16 else {}),
            "torch_autocast": {"enabled": autocast, "dtype": "bfloat16"},
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        # DeepSpeed's own engine unpickles with weights_only=False: a planted file would run code
        self.engine.checkpoint_engine = WeightsOnlyLoads(self.engine.checkpoint_engine)
        self.module = self.engine.module

    def forward(self, **kwargs):
        return self.engine(**kwargs)

    def backward_and_step(self, loss: torch.Tensor) -> None:
        # passn already divides by the step's sequence count: no second division by GAS
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save_state(self, local_dir: str) -> None:
        self.engine.save_checkpoint(local_dir, tag="state", save_latest=False)

    def load_state(self, local_dir: str) -> None:
        path, _ = self.engine.load_checkpoint(local_dir, tag="state", load_module_strict=True)
        if path is None:  # DeepSpeed only warns when nothing was found
            raise ckpt.CheckpointError(f"DeepSpeed found no training state in {local_dir}")


class DDPEngine:
    """torch AdamW, wrapped in DistributedDataParallel when a process group is up (a single
    process without one trains the bare module: the one-process loop of the unit tests)."""

    def __init__(self, model, cfg: RunConfig, micro_batches: int, device: torch.device) -> None:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        o = cfg.optim
        model.to(device)
        self.module = model
        self.distributed = dist.is_available() and dist.is_initialized()
        self.engine = (DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
                       if self.distributed else model)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=o.learning_rate, betas=o.betas,
                                           weight_decay=o.weight_decay, eps=1e-8)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(o.warmup_steps))
        self.micro_batches, self.max_grad_norm = micro_batches, o.max_grad_norm
        self._micro = 0

    def forward(self, **kwargs):
        return self.engine(**kwargs)

    def backward_and_step(self, loss: torch.Tensor) -> None:
        loss.backward()
        self._micro += 1
        if self._micro == self.micro_batches:
            if self.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self._micro = 0

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save_state(self, local_dir: str) -> None:
        import torch.distributed as dist

        if not self.distributed or dist.get_rank() == 0:  # DDP replicates everything: one copy suffices
            Path(local_dir).mkdir(parents=True, exist_ok=True)
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       f"{local_dir}/optimizer.pt")

    def load_state(self, local_dir: str) -> None:
        from safetensors.torch import load_file

        state = load_training_state(f"{local_dir}/optimizer.pt", allowed=())
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        weights = load_file(f"{Path(local_dir).parent}/model/model.safetensors")
        self.module.load_state_dict(weights, strict=False)


def make_engine(model, cfg: RunConfig, micro_batches: int, device: torch.device) -> DeepSpeedEngine | DDPEngine:
    engine_cls = DeepSpeedEngine if cfg.resources.backend == "deepspeed" else DDPEngine
    return engine_cls(model, cfg, micro_batches, device)


def named_weights(engine, cfg: RunConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's (name, parameter) pairs, whole. Under ZeRO-3 each is gathered alone and
    partitioned again when the next is asked for, so the whole model is never gathered at once;
    every worker must walk the stream to its end (each gather is a collective)."""
    if not (cfg.resources.zero_stage == 3 and cfg.resources.backend == "deepspeed"):
        yield from engine.module.named_parameters()
        return
    import deepspeed

    for name, parameter in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([parameter], modifier_rank=None):
            yield name, parameter


def export_weights(engine, tokenizer, cfg: RunConfig, folder: str, here: bool = True) -> None:
    """The model as a Hugging Face folder, written by this worker if ``here``; every worker calls
    it (ZeRO-3 gathers the parameters first)."""
    if cfg.resources.zero_stage == 3 and cfg.resources.backend == "deepspeed":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            if here:
                write_model_folder(engine.module, tokenizer, folder)
    elif here:
        write_model_folder(engine.module, tokenizer, folder)
