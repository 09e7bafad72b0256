"""The Ray cluster a passn command runs on, and the paths and environment its workers see.

    with ray_session(address) as started_here:   # join RAY_ADDRESS / address, or start a local cluster
        ...                                      # shut down on exit only if started here

Every entry point (train, evaluate, sweep, serve, prove, the benchmarks) goes through
:func:`ray_session`, so each starts or joins Ray the same way and none shuts down a cluster it did
not start.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import fsspec

from jobs.reaper import reap_on_death
from passn import faults
from passn.storage import TIMEOUT_ENV

# NVLink multicast off in NCCL, PyTorch's symmetric memory and NVSHMEM, in every process of a passn
# job: the CLI's own (`multicast_off`), its Ray workers (`runtime_env`) and what they start (vLLM's
# engine processes inherit it). On shared hosts a program that uses multicast can put the node's GPUs
# out of service; the all-reduces passn runs gain little from it. A value set in the environment
# that starts passn wins (NCCL_NVLS_ENABLE=1 turns it back on).
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def multicast_off() -> dict[str, str]:
    """Set MULTICAST_OFF's variables in this process where the environment does not name them;
    returns the values in force."""
    for name, value in MULTICAST_OFF.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in MULTICAST_OFF}


def runtime_env() -> dict[str, Any]:
    """Environment variables every Ray worker of a passn job gets.

    No credentials here: a runtime_env is recorded in Ray's metadata (dashboard, state API). Workers
    of a local cluster inherit the driver's environment; a cluster's nodes have their own (secrets).
    """
    keep = ("PYTHONPATH", "PASSN_MODEL_CACHE", "TORCH_EXTENSIONS_DIR", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
            "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS", TIMEOUT_ENV,
            *faults.ALL)  # fault injection, read by the workers of a local cluster
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(multicast_off())  # also on a cluster's nodes, whose environment is their own
    env.update(RAY_USAGE_STATS_ENABLED="0", VLLM_NO_USAGE_STATS="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false",
               RAY_TRAIN_ENABLE_PRINT_PATCH="0")  # else every rank-0 line is printed twice
    return {"env_vars": env}


def absolute_path(path: str | None) -> str | None:
    """A local path made absolute (Ray workers run in their own working directories); URLs and
    ``pretrained:NAME`` unchanged."""
    from passn.pretrained import SCHEME

    if path is None or "://" in path or path.startswith(SCHEME):
        return path
    return os.path.abspath(path)


def path_exists(path: str) -> bool:
    """Whether a local path or URL (``s3://...``) exists."""
    fs, p = fsspec.core.url_to_fs(path)
    return fs.exists(p)


@contextlib.contextmanager
def ray_session(address: str | None = None, *, log_to_driver: bool = False, num_cpus: int | None = None,
                **init_kwargs: Any) -> Iterator[bool]:
    """Join the cluster at ``address`` (else ``RAY_ADDRESS``, else the one this process already
    joined) or start a local one with ``num_cpus``; yields whether it was started here, and shuts
    down on exit only what was started here."""
    import ray

    started_here = not ray.is_initialized()
    with contextlib.ExitStack() as stack:
        if started_here:
            address = address or os.environ.get("RAY_ADDRESS")
            if not address:  # a cluster of this process's own: it must not outlive a SIGKILL of it
                stack.enter_context(reap_on_death())
            local = {} if address or num_cpus is None else {"num_cpus": num_cpus}
            ray.init(address=address, include_dashboard=False, log_to_driver=log_to_driver,
                     runtime_env=runtime_env(), **local, **init_kwargs)
            stack.callback(ray.shutdown)
        yield started_here
