"""Local scratch folders (staging a checkpoint, a resume's download, plots, Ray's storage), named
after the process that owns them, and the sweep that removes those whose owner is gone.

    with scratch("ckpt") as local:      # $TMPDIR/passn-ckpt-pid4242-k2j3/, removed on every path
        ...
    sweep_stale()                       # at start: folders of dead processes (a SIGKILL, a crash)

A folder's owner is in its name (``passn-<kind>-pid<PID>-<random>``): the sweep removes only
folders whose PID no longer runs on this machine, so two runs sharing a temp dir never remove each
other's folders. Folders named otherwise (other programs', or passn's without a PID) are left alone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

_OWNED = re.compile(r"passn-[a-z0-9-]+?-pid(\d+)-.+")


def scratch_dir(kind: str) -> Path:
    """A new folder ``passn-<kind>-pid<this process>-...`` in the temp dir; the caller removes it."""
    return Path(tempfile.mkdtemp(prefix=f"passn-{kind}-pid{os.getpid()}-"))


@contextlib.contextmanager
def scratch(kind: str) -> Iterator[Path]:
    """A scratch folder removed when the block ends, however it ends."""
    local = scratch_dir(kind)
    try:
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)


def pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_stale(root: str | Path | None = None) -> list[Path]:
    """Remove the scratch folders in ``root`` (default: the temp dir) whose owning process is
    gone; returns them."""
    root = Path(root or tempfile.gettempdir())
    removed = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _OWNED.fullmatch(entry.name)
        if m is None or not entry.is_dir() or entry.is_symlink() or pid_running(int(m.group(1))):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed
