"""Processes a passn command started outlive it only while it lives.

A driver that started its own Ray cluster shuts it down on every exit it sees, but a SIGKILL is not
seen: Ray's servers and workers die with the driver, and two of its agents (DashboardAgent,
RuntimeEnvAgent) did not, still running a minute later (tests/integration/test_train.py). So where
passn starts a cluster, :func:`reap_on_death` starts this module as a small process of its own that
notes the driver's descendants once a second and, if the driver dies without saying goodbye (the
pipe between them closes with no farewell byte), kills those still running and their children.
After a farewell it kills those that the cluster's shutdown left behind (vLLM engine processes of a
Serve replica outlived it, and `passn serve`'s tests left them running):

    with reap_on_death():      # around the life of the local cluster
        ...
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
from collections.abc import Iterator

FAREWELL = b"q"  # the driver is ending the cluster itself: nothing to reap
POLL_S = 1.0


@contextlib.contextmanager
def reap_on_death() -> Iterator[None]:
    """Start the reaper for this process; on a normal exit from the block it is told to stand down."""
    reaper = subprocess.Popen([sys.executable, "-m", "jobs.reaper", str(os.getpid())], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, start_new_session=True)  # a killpg of ours spares it
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            reaper.stdin.write(FAREWELL)
            reaper.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            reaper.wait(timeout=10)


def watch(driver_pid: int) -> list[int]:
    """Note ``driver_pid``'s descendants until its pipe on stdin closes. Without the farewell (the
    driver died) kill every one still running; after it (the driver shut its cluster down) kill those
    no longer the driver's descendants (a worker's child that its death left to init, such as a vLLM
    engine process). Returns the PIDs killed."""
    import psutil

    known: dict[int, float] = {}  # pid -> creation time (a PID reused since is someone else)
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return []
    farewell = False
    while True:
        ready, _, _ = select.select([sys.stdin.buffer], [], [], POLL_S)
        if ready:
            farewell = os.read(sys.stdin.fileno(), 1) == FAREWELL
            break  # a farewell, or the end of the pipe without one: the driver died
        try:
            for child in driver.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    known.setdefault(child.pid, child.create_time())
        except psutil.NoSuchProcess:
            break
    keep: set[int] = {os.getpid()}  # this process is one of the driver's too
    if farewell:  # the cluster was shut down: what is still the driver's is its own business, not a leak
        with contextlib.suppress(psutil.Error):
            keep |= {p.pid for p in driver.children(recursive=True)}
    victims: dict[int, psutil.Process] = {}
    for pid, created in known.items():
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            if pid not in keep and process.create_time() == created:
                victims.update((p.pid, p) for p in [process, *process.children(recursive=True)] if p.pid not in keep)
    for process in victims.values():
        with contextlib.suppress(psutil.Error):
            process.kill()
    return sorted(victims)


if __name__ == "__main__":
    killed = watch(int(sys.argv[1]))
    if killed:
        print(f"passn: stopped {len(killed)} processes that the cluster of process {sys.argv[1]} left running",
              file=sys.stderr)
