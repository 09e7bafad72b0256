"""Everything a run must save to resume bitwise, saved and loaded by one object; and the metrics sink.

A checkpoint ``checkpoints/step_NNNNNNNN/`` holds:

    state/            the engine: weights, optimizer, scheduler (DeepSpeed's own layout, per rank shards)
    rng/rank_R.json   each worker's Python, numpy and torch generators
    model/            the weights as a Hugging Face folder (what evaluation, Serve and a resume load)
    online.json       the batch source's samples (DCOa's p_MC cache, Dr. GRPO's rollouts), if any
    manifest.json     step, epoch, the batch source's stream position, the training fields, sha256 of every file

    state = TrainingState(cfg, run_dir, engine, tokenizer, batches, collective)
    state.restore(say, plan)  # from the driver's choice (passn.checkpoint.plan_resume), if any
    state.save(epoch_end=True)
"""

from __future__ import annotations

import json
import random
import shutil
from typing import Any

import fsspec
import numpy as np
import torch

from passn import checkpoint as ckpt
from passn.collective import Collective
from passn.scratch import scratch, scratch_dir
from passn.config import ConfigError, RunConfig, config_hash, training_differences, training_fields, training_hash
from trainer.engines import export_weights


def check_resumable(manifest: dict[str, Any], cfg: RunConfig, run_dir: str) -> None:
    """A checkpoint resumes only under a configuration that trains the same thing; operational
    fields (checkpoint cadence, kept checkpoints, timeouts, evaluation) may change."""
    if "training_hash" in manifest:
        if manifest["training_hash"] == training_hash(cfg):
            return
        changed = "; ".join(training_differences(manifest.get("training_fields", {}), cfg))
    elif manifest["config_hash"] == config_hash(cfg):  # a checkpoint written before training hashes
        return
    else:
        changed = f"configuration hash {manifest['config_hash'][:12]}, now {config_hash(cfg)[:12]}"
    raise ConfigError(f"{run_dir} was trained with another configuration ({changed}): resume with the same "
                      "training fields or use a new --run-dir")


def rng_state() -> dict[str, Any]:
    py = random.getstate()
    return {"python": [py[0], list(py[1]), py[2]], "numpy": np.random.get_state()[1].tolist(),
            "numpy_pos": int(np.random.get_state()[2]), "torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


class TrainingState:
    """The step counter, the engine, the batch source (stream position and sample caches) and the
    generators of one worker; ``save`` and ``restore`` are each other's inverse."""

    def __init__(self, cfg: RunConfig, run_dir: str, engine, tokenizer, batches, collective: Collective,
                 sink: MetricsSink | None = None) -> None:
        self.cfg, self.run_dir, self.engine, self.tokenizer = cfg, run_dir, engine, tokenizer
        self.batches, self.collective, self.sink = batches, collective, sink
        self.step = 0

    def save(self, epoch_end: bool) -> None:
        """Checkpoint ``step`` into the run dir (every worker calls it: shards and collectives)."""
        c = self.collective
        remote = ckpt.checkpoint_dir(self.run_dir, self.step)
        with scratch("ckpt") as local:
            try:
                self.engine.save_state(str(local / "state"))
                (local / "rng").mkdir()
                (local / "rng" / f"rank_{c.rank}.json").write_text(json.dumps(rng_state()))
                export_weights(self.engine, self.tokenizer, self.cfg, str(local / "model"), here=c.rank == 0)
            except (OSError, RuntimeError) as exc:  # torch reports a full disk as "iostream error"
                raise ckpt.CheckpointError(
                    f"{remote}: saving step {self.step} failed writing its staging folder {local} ({exc}): is "
                    "the disk (or its quota) full? the checkpoints before it are untouched: free space and "
                    "resume") from exc
            self.batches.settle()
            source = self.batches.state()
            if c.rank == 0 and "online" in source:
                (local / "online.json").write_text(json.dumps(source["online"]))
            try:
                ckpt.upload_tree(local, remote)
            except ckpt.StorageUnreachable as exc:
                raise ckpt.CheckpointError(
                    f"{remote}: saving step {self.step} failed: {exc}; the checkpoints before it are untouched: "
                    "resume once the storage answers") from None
            files = c.gather(ckpt.digest_tree(local))
        if c.rank == 0:
            merged = {k: v for per_rank in files for k, v in per_rank.items()}
            ckpt.write_manifest(remote, merged, step=self.step, epoch=self.batches.stream.progress, epoch_end=epoch_end,
                                objective=self.cfg.objective.model_dump(), config_hash=config_hash(self.cfg),
                                training_hash=training_hash(self.cfg), training_fields=training_fields(self.cfg),
                                data_position=source["data_position"], world_size=c.world)
            ckpt.prune_checkpoints(self.run_dir, self.cfg.storage.keep_checkpoints)
            if self.sink is not None:
                self.sink.flush()
        c.barrier()

    def restore(self, say=print, plan: ckpt.ResumePlan | None = None) -> bool:
        """Load the checkpoint the driver chose (``plan``: passn.checkpoint.checkpoint_to_resume), or
        without a plan the newest whose manifest verifies; False when there is none."""
        resumed = ckpt.newest_valid_checkpoint(self.run_dir, warn=say) if plan is None else \
            ckpt.checkpoint_to_resume(self.run_dir, plan, warn=say)
        if resumed is None:
            return False
        m, rank = resumed.manifest, self.collective.rank
        check_resumable(m, self.cfg, self.run_dir)
        with scratch("resume") as local:
            # this rank's ZeRO shards (stage 2 and 3 name them by rank), the shared state files, the model
            mine = [f for f in m["files"] if f.startswith(("state/", "model/")) and
                    ("zero_pp_rank_" not in f or f"zero_pp_rank_{rank}_" in f)]
            ckpt.download_tree(resumed.path, local, only={f: m["files"][f] for f in [*mine, f"rng/rank_{rank}.json"]})
            try:
                self.engine.load_state(str(local / "state"))
            except ckpt.CheckpointError as exc:  # name the run dir's file, not this worker's copy
                raise ckpt.CheckpointError(str(exc).replace(str(local), resumed.path)) from None
            set_rng_state(json.loads((local / f"rng/rank_{rank}.json").read_text()))
        source: dict[str, Any] = {"data_position": m["data_position"]}
        if "online.json" in m["files"]:
            with fsspec.open(f"{resumed.path.rstrip('/')}/online.json", "r") as f:
                source["online"] = json.load(f)
        self.batches.load_state(source)
        self.step = m["step"]
        say(f"resuming from step {self.step} (epoch {m['epoch']:.2f}) in {resumed.path}", flush=True)
        return True


# ---------------------------------------------------------------------------------------------
# Metrics: metrics.jsonl and TensorBoard in the run dir
# ---------------------------------------------------------------------------------------------


class MetricsSink:
    """metrics.jsonl and TensorBoard events, staged locally and copied to the run dir on flush."""

    def __init__(self, run_dir: str) -> None:
        from tensorboardX import SummaryWriter

        self.run_dir = run_dir.rstrip("/")
        self.local = scratch_dir("metrics")
        fs, root = fsspec.core.url_to_fs(f"{self.run_dir}/metrics.jsonl")
        if fs.exists(root):
            fs.get_file(root, str(self.local / "metrics.jsonl"))
        self.writer = SummaryWriter(str(self.local / "tensorboard"))

    def log(self, row: dict[str, Any]) -> None:
        with open(self.local / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if isinstance(value, (int, float)) and key != "step":
                self.writer.add_scalar(f"train/{key}", value, row["step"])

    def flush(self) -> None:
        self.writer.flush()
        ckpt.upload_tree(self.local, self.run_dir)

    def close(self) -> None:
        self.flush()
        self.writer.close()
        shutil.rmtree(self.local, ignore_errors=True)


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """Per-step metrics of a run; after a resume the re-run steps replace the earlier lines."""
    rows: dict[int, dict[str, Any]] = {}
    with fsspec.open(f"{run_dir.rstrip('/')}/metrics.jsonl", "r") as f:
        for line in f:
            row = json.loads(line)
            rows[row["step"]] = row
    return [rows[s] for s in sorted(rows)]
