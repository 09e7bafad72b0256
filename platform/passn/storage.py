"""How every s3:// path passn opens through fsspec retries throttling and brief outages.

botocore's default retry mode ("legacy", 5 attempts) gives up after four 503s in a row, and s3fs
retries a ClientError only when its message names SlowDown, which a throttled HEAD request (an
answer without a body) never does: a burst of throttling failed a checkpoint upload. passn asks
botocore for its "standard" mode (exponential backoff with jitter, throttling and 5xx retried) and
10 attempts, through fsspec's per-protocol defaults, so the paths of every module get it:

    configure_s3_retries()   # once per process: ``import passn`` does it

An environment that chooses its own retries (``AWS_RETRY_MODE`` or ``AWS_MAX_ATTEMPTS``) keeps them.

Retries are not a deadline: with the S3 server gone, s3fs kept probing the bucket for minutes
without end during a checkpoint upload (an outage test). :func:`transfer_timeout_s` bounds each
file that passn copies to or from remote storage.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

S3_RETRIES = {"mode": "standard", "max_attempts": 10}
TIMEOUT_ENV = "PASSN_STORAGE_TIMEOUT_S"  # seconds one remote file copy may take, plus 1 s per MiB
DEFAULT_TIMEOUT_S = 300.0


def transfer_timeout_s(nbytes: int, environ: Mapping[str, str] = os.environ) -> float:
    """How long copying one file of ``nbytes`` to or from remote storage may take before passn
    calls the storage unreachable: ``$PASSN_STORAGE_TIMEOUT_S`` (default 300 s) plus a second per
    MiB (a link slower than 1 MiB/s is taken for an outage)."""
    raw = environ.get(TIMEOUT_ENV, "")
    try:
        base = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: not a number of seconds") from None
    if not base > 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: must be a positive number of seconds")
    return base + nbytes / 2**20


def configure_s3_retries(environ: Mapping[str, str] = os.environ) -> None:
    """Make :data:`S3_RETRIES` the default ``config_kwargs["retries"]`` of fsspec's S3 filesystems
    in this process, unless the environment or fsspec's own configuration sets retries."""
    if "AWS_RETRY_MODE" in environ or "AWS_MAX_ATTEMPTS" in environ:
        return
    import fsspec.config

    s3 = fsspec.config.conf.setdefault("s3", {})
    s3.setdefault("config_kwargs", {}).setdefault("retries", dict(S3_RETRIES))
