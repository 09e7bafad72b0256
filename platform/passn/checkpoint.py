"""Checkpoints in a run directory (local or s3://), committed by a manifest written last.

Layout of ``RUN_DIR/checkpoints/step_00000120/``:

    model/            Hugging Face folder: config.json, model.safetensors, tokenizer files
    state/            optimizer, scheduler and ZeRO shards (one file set per rank)
    rng/rank_N.json   each rank's random-number-generator state
    manifest.json     step, epoch, objective, config hash, data position, every file's size and
                      sha256: written last, so a checkpoint without a valid manifest does not exist

:func:`newest_valid_checkpoint` walks checkpoints newest first, verifies each manifest against
the files, and names every one it has to skip. ``passn train`` does this once, in the driver
(:func:`plan_resume`), and its workers resume from that choice (:func:`checkpoint_to_resume`).
The manifest is an integrity check against corruption, not a signature: whoever can write the
files can rewrite it. What keeps a written file from running code is that passn unpickles nothing
beyond tensors, plain containers and :data:`TRAINING_STATE_GLOBALS` (:func:`check_state_files`;
the trainer's weights-only loads).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import fsspec
from fsspec.exceptions import FSTimeoutError

from passn import storage

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"step_(\d{8})")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (the message says which and why)."""


# The classes DeepSpeed pickles into its own training state beside tensors and plain containers,
# found by saving ZeRO stages 0, 1 and 3 with DeepSpeed 0.19 and listing what torch's weights-only
# unpickler refuses (stage 0: none; 1 and 2: all three; 3: the first two). None of them runs code
# of the file's choosing when rebuilt: a loss-scaler record, an enum, a dataclass of two ints.
TRAINING_STATE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def refused_globals(f) -> list[str]:
    """The globals a ``torch.save`` file (a path or an open binary file) names beyond torch's
    weights-only set and TRAINING_STATE_GLOBALS; reads the file's pickle, never runs it. A file
    that is not torch's zip format says so (the weights-only load refuses it too, if it pickles code)."""
    import torch

    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(f)
    except (ValueError, RuntimeError) as exc:  # not a zip written by torch.save, or a torn one
        raise CheckpointError(f"not a torch.save zip file ({exc})") from None
    return [name for name in names if name not in TRAINING_STATE_GLOBALS]


def check_state_files(run_dir: str) -> None:
    """Refuse a run dir whose checkpoints hold a training-state file that pickles anything but
    tensors, plain containers and TRAINING_STATE_GLOBALS, naming the file; reads only the pickles
    (not the tensors) of the ``.pt`` files each readable manifest lists. A damaged file is left
    to the manifest's check, which skips its checkpoint."""
    for path in list_checkpoints(run_dir):
        try:
            listed = verify_checkpoint(path, hashes=False).manifest["files"]
        except CheckpointError:
            continue
        fs, root = fsspec.core.url_to_fs(path)
        for rel in sorted(r for r in listed if r.endswith(".pt")):
            with fs.open(f"{root}/{rel}", "rb") as f:
                try:
                    names = refused_globals(f)
                except CheckpointError:
                    continue
            if names:
                raise CheckpointError(refusal(f"{path}/{rel}", names))


def refusal(name: str, globals_named: list[str] | str) -> str:
    """The message for a training-state file passn will not unpickle."""
    what = ", ".join(globals_named) if isinstance(globals_named, list) else globals_named
    return (f"{name}: pickles {what}, which passn does not load (training state holds tensors, plain containers "
            f"and DeepSpeed's own state classes only): someone or something else wrote this file; delete its "
            f"checkpoint folder to resume from an earlier one, or use a new --run-dir")


def file_digest(path: str | Path) -> dict[str, Any]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return {"sha256": h.hexdigest(), "bytes": size}


def digest_tree(root: str | Path) -> dict[str, dict[str, Any]]:
    """{relative path: digest} for every file under a local folder."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): file_digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


def checkpoint_dir(run_dir: str, step: int) -> str:
    return f"{run_dir.rstrip('/')}/checkpoints/step_{step:08d}"


class StorageUnreachable(TimeoutError):
    """Remote storage did not take or give a file within its deadline (passn.storage.transfer_timeout_s)."""


def _deadline(fs, nbytes: int) -> tuple[dict[str, float], float]:
    """The ``timeout`` keyword for one remote file copy of ``nbytes`` (an async filesystem such as
    s3fs takes it on every call; a local one needs none), and its seconds."""
    timeout_s = storage.transfer_timeout_s(nbytes)
    return ({"timeout": timeout_s} if getattr(fs, "async_impl", False) else {}), timeout_s


def _unreachable(url: str, verb: str, timeout_s: float) -> StorageUnreachable:
    return StorageUnreachable(f"{url}: the storage did not {verb} the file within {timeout_s:.0f} s (is it down or "
                              f"unreachable? {storage.TIMEOUT_ENV} sets the deadline)")


def upload_tree(local: str | Path, remote: str) -> None:
    """Copy a local folder's files to ``remote`` (local path or URL), creating folders as needed.
    On remote storage each file has a deadline (:func:`passn.storage.transfer_timeout_s`): past it,
    StorageUnreachable naming the file."""
    fs, root = fsspec.core.url_to_fs(remote)
    local = Path(local)
    for path in sorted(local.rglob("*")):
        if path.is_file():
            rel = path.relative_to(local).as_posix()
            deadline, timeout_s = _deadline(fs, path.stat().st_size)
            try:
                fs.makedirs(f"{root}/{rel}".rsplit("/", 1)[0], exist_ok=True, **deadline)
                fs.put_file(str(path), f"{root}/{rel}", **deadline)
            except FSTimeoutError:
                raise _unreachable(f"{remote.rstrip('/')}/{rel}", "take", timeout_s) from None


def download_tree(remote: str, local: str | Path, only: Mapping[str, dict[str, Any]] | None = None) -> None:
    """Copy the files under ``remote`` into ``local``: all of them, or only those of ``only``, a
    manifest's entries (relative path -> its entry, with ``bytes``). On remote storage each file has
    a deadline, as in :func:`upload_tree`, from its size: the entry's, else asked for (one request
    a file)."""
    fs, root = fsspec.core.url_to_fs(remote)
    wanted = list(only) if only is not None else [p[len(root) + 1 :] for p in fs.find(root)]
    sizes = {rel: entry["bytes"] for rel, entry in (only or {}).items()}
    for rel in wanted:
        _check_relative(rel)
        target = Path(local) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        deadline, timeout_s = _deadline(fs, sizes.get(rel, 0))
        try:
            if deadline and rel not in sizes:
                deadline, timeout_s = _deadline(fs, fs.size(f"{root}/{rel}", **deadline) or 0)
            fs.get_file(f"{root}/{rel}", str(target), **deadline)
        except FSTimeoutError:
            raise _unreachable(f"{remote.rstrip('/')}/{rel}", "give", timeout_s) from None


def _check_relative(rel: str) -> None:
    if rel.startswith("/") or ".." in Path(rel).parts:
        raise CheckpointError(f"manifest lists an unsafe path {rel!r}")


def write_manifest(remote_dir: str, files: dict[str, dict[str, Any]], **fields: Any) -> dict[str, Any]:
    """Write ``manifest.json`` (the commit marker) after every listed file is in place."""
    manifest = {"format": FORMAT_VERSION, "created": time.time(), **fields, "files": files}
    fs, root = fsspec.core.url_to_fs(remote_dir)
    with fs.open(f"{root}/{MANIFEST}", "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    return manifest


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    path: str
    step: int
    manifest: dict[str, Any]

    @property
    def model_dir(self) -> str:
        return f"{self.path}/model"


def verify_checkpoint(path: str, hashes: bool = True) -> Checkpoint:
    """The checkpoint at ``path`` if its manifest verifies; CheckpointError saying why otherwise."""
    fs, root = fsspec.core.url_to_fs(path)
    try:
        with fs.open(f"{root}/{MANIFEST}", "r") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {MANIFEST} (the write never finished)") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: {MANIFEST} is not valid JSON ({exc.msg})") from None
    if manifest.get("format") != FORMAT_VERSION or "files" not in manifest or "step" not in manifest:
        raise CheckpointError(f"{path}: {MANIFEST} has an unknown format")
    for rel, digest in manifest["files"].items():
        _check_relative(rel)
        full = f"{root}/{rel}"
        try:
            size = fs.size(full)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: {rel} is missing") from None
        if size != digest["bytes"]:
            raise CheckpointError(f"{path}: {rel} has {size} bytes, the manifest says {digest['bytes']}")
        if hashes:
            h = hashlib.sha256()
            with fs.open(full, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            if h.hexdigest() != digest["sha256"]:
                raise CheckpointError(f"{path}: {rel} does not match its sha256 in the manifest")
    return Checkpoint(path=path.rstrip("/"), step=int(manifest["step"]), manifest=manifest)


def list_checkpoints(run_dir: str) -> list[str]:
    """Checkpoint folders in ``run_dir``, newest (highest step) first."""
    fs, root = fsspec.core.url_to_fs(f"{run_dir.rstrip('/')}/checkpoints")
    if not fs.exists(root):
        return []
    steps = []
    for entry in fs.ls(root, detail=False):
        m = _STEP_DIR.fullmatch(entry.rstrip("/").rsplit("/", 1)[-1])
        if m:
            steps.append(int(m.group(1)))
    return [checkpoint_dir(run_dir, s) for s in sorted(steps, reverse=True)]


def newest_valid_checkpoint(run_dir: str, warn=print, hashes: bool = True) -> Checkpoint | None:
    """The newest checkpoint whose manifest verifies, warning about each newer one skipped.

    Returns None when the run directory has no checkpoint folders at all; raises CheckpointError
    when it has some but none verifies (never a silent restart from scratch).
    """
    plan = plan_resume(run_dir, warn, hashes)
    return None if plan.path is None else verify_checkpoint(plan.path, hashes=False)


@dataclasses.dataclass(frozen=True)
class ResumePlan:
    """What the driver found in a run dir before any worker started: the checkpoint to resume
    from (None: a fresh start) and the newer ones it refused, each by the sha256 of its manifest
    (None: it had none), so that a worker restarted later skips them unless they were written again."""

    path: str | None
    refused: dict[str, str | None] = dataclasses.field(default_factory=dict)


def _manifest_sha(path: str) -> str | None:
    fs, root = fsspec.core.url_to_fs(path)
    try:
        return hashlib.sha256(fs.cat_file(f"{root}/{MANIFEST}")).hexdigest()
    except FileNotFoundError:
        return None


def plan_resume(run_dir: str, warn=print, hashes: bool = True) -> ResumePlan:
    """The newest checkpoint that verifies (every file's sha256 with ``hashes``), once, in the driver.

    CheckpointError naming each checkpoint and why when the run dir has some and none verifies.
    """
    candidates = list_checkpoints(run_dir)
    refused: dict[str, str | None] = {}
    problems = []
    for path in candidates:
        try:
            return ResumePlan(verify_checkpoint(path, hashes=hashes).path, refused)
        except CheckpointError as exc:
            problems.append(str(exc))
            refused[path] = _manifest_sha(path)
            warn(f"warning: skipping checkpoint {exc}")
    if candidates:
        raise CheckpointError(f"{run_dir}: no checkpoint verifies ({'; '.join(problems)}); move them away "
                              "(or use a new --run-dir) to start over")
    return ResumePlan(None)


def checkpoint_to_resume(run_dir: str, plan: ResumePlan, warn=print) -> Checkpoint | None:
    """On a worker: the driver's choice, or a checkpoint this run wrote after it (a worker group
    restarted by Ray Train resumes from its newest); only those are hashed again."""
    chosen = None if plan.path is None else plan.path.rstrip("/")
    for path in list_checkpoints(run_dir):
        if path == chosen:
            return verify_checkpoint(path, hashes=False)  # hashed by the driver
        if path in plan.refused and _manifest_sha(path) == plan.refused[path]:
            continue  # refused by the driver and not written since
        try:
            return verify_checkpoint(path)
        except CheckpointError as exc:
            warn(f"warning: skipping checkpoint {exc}")
    if chosen is not None:
        raise CheckpointError(f"{chosen}: the checkpoint chosen to resume from is gone, and no newer one verifies")
    return None


def prune_checkpoints(run_dir: str, keep: int, protect: Iterable[int] = ()) -> list[str]:
    """Delete all but the ``keep`` newest committed checkpoints (never an uncommitted newer one's
    predecessor: call only after a new manifest is written). Returns the deleted paths."""
    protected = set(protect)
    deleted = []
    fs, _ = fsspec.core.url_to_fs(run_dir)
    committed = [p for p in list_checkpoints(run_dir) if fs.exists(f"{fsspec.core.url_to_fs(p)[1]}/{MANIFEST}")]
    for path in committed[keep:]:
        step = int(_STEP_DIR.fullmatch(path.rsplit("/", 1)[-1]).group(1))  # type: ignore[union-attr]
        if step in protected:
            continue
        fs.rm(fsspec.core.url_to_fs(path)[1], recursive=True)
        deleted.append(path)
    return deleted
