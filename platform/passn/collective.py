"""What the training workers say to each other, behind one small interface.

Every decision a batch source takes (which candidates to keep, their weights, p_MC) must be the
same on every worker, so the sources gather what each worker computed on its share. They do it
through a :class:`Collective`: :class:`OneProcess` for a single process (unit tests, one worker,
no process group) and :class:`TorchDistributed` over ``torch.distributed`` (gloo or NCCL, as Ray
Train sets it up).

    collective = OneProcess()
    collective.gather({"weights": [0.5]})   # [{"weights": [0.5]}]
    collective.sum([2.0, 3.0])               # [2.0, 3.0]
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Collective(Protocol):
    rank: int
    world: int

    def gather(self, obj: Any) -> list[Any]:
        """Every worker's ``obj``, in rank order (on every worker)."""

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over workers, in float64."""

    def min(self, values: list[float]) -> list[float]:
        """Element-wise minimum over workers."""

    def barrier(self) -> None:
        """Wait until every worker is here."""


class OneProcess:
    """The collective of a single worker: every operation is the identity."""

    rank, world = 0, 1

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def sum(self, values: list[float]) -> list[float]:
        return [float(v) for v in values]

    def min(self, values: list[float]) -> list[float]:
        return [float(v) for v in values]

    def barrier(self) -> None:
        pass


class TorchDistributed:
    """``torch.distributed``'s default process group; reductions run on ``device`` (NCCL needs CUDA)."""

    def __init__(self, device: torch.device) -> None:
        import torch.distributed as dist

        self._dist, self.device = dist, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        self._dist.all_gather_object(out, obj)
        return out

    def _reduce(self, values: list[float], op) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self._dist.all_reduce(t, op=op)
        return t.tolist()

    def sum(self, values: list[float]) -> list[float]:
        return self._reduce(values, self._dist.ReduceOp.SUM)

    def min(self, values: list[float]) -> list[float]:
        return self._reduce(values, self._dist.ReduceOp.MIN)

    def barrier(self) -> None:
        self._dist.barrier()
