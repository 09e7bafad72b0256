"""`passn train CONFIG --run-dir DIR`: fine-tune with CE, DCO, DCOstep, DCOa or Dr. GRPO on Ray Train + DeepSpeed.

The driver: it checks everything that can fail on bad input before any worker starts, writes the
run's ``config.yaml``, and runs :func:`trainer.loop.train` on every Ray Train worker. A run directory
that already holds checkpoints is resumed from the newest one whose manifest verifies (chosen here,
before Ray starts; a worker group Ray Train's FailureConfig restarts resumes from the newest one
this run wrote since).

    passn train configs/tiny.yaml --run-dir runs/ce
    passn train configs/tiny.yaml --run-dir runs/dco --set objective.kind=dco --set objective.budget=64
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from typing import Any

import fsspec

from jobs.cluster import absolute_path, ray_session
from passn import checkpoint as ckpt
from passn.batches import ONLINE_KINDS
from passn.config import ConfigError, RunConfig, load_config, to_yaml
from passn.data import encode_examples
from passn import pretrained, storage
from passn.models import check_safetensors_weights, load_tokenizer
from passn.scratch import scratch, sweep_stale
from passn.tasks import DataError, build_task, held_out_problems
from trainer.loop import FAULT_ENV, fault_marker  # noqa: F401  (the fault hook the tests set)
from trainer.state import check_resumable, read_metrics


# ---------------------------------------------------------------------------------------------
# Checks before any worker starts
# ---------------------------------------------------------------------------------------------


def check_before_training(cfg: RunConfig, run_dir: str) -> None:
    """Everything that can fail on bad input, checked in the driver before workers start."""
    try:
        storage.transfer_timeout_s(0)  # a bad $PASSN_STORAGE_TIMEOUT_S now, not at the first checkpoint
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.objective.whole_proof and cfg.resources.zero_stage == 3 and cfg.resources.backend == "deepspeed":
        raise ConfigError("objective.whole_proof forwards each worker's proofs without gradients, a different number "
                          "of batches per worker, which ZeRO-3's collective forwards cannot do: use zero_stage <= 2")
    if cfg.objective.whole_proof and cfg.task.kind != "coq":
        raise ConfigError("objective.whole_proof needs a task made of proofs (the Coq task); the "
                          f"{cfg.task.kind} task has single-step examples: set objective.whole_proof = false")
    try:
        tokenizer, limit = load_tokenizer(cfg.model)  # the driver never loads the weights
    except FileNotFoundError as exc:  # local or s3://: nothing there
        raise ConfigError(f"model.path: {cfg.model.path!r} is not there ({exc}): set it to a Hugging Face model "
                          "folder (local or s3://) or pretrained:NAME") from None
    if cfg.model.path and not cfg.model.path.startswith(pretrained.SCHEME):  # passn converts those itself
        check_safetensors_weights(cfg.model.path)
    ckpt.check_state_files(run_dir)  # a file no worker would load: refused here, not once per Ray Train retry
    task = build_task(cfg, run_dir, tokenizer)
    train, held_out = task.problems("train"), held_out_problems(task, cfg)
    for problems in (train, held_out):
        encode_examples(tokenizer, task, problems, limit)
    sampled = {"training": train if cfg.objective.kind in ONLINE_KINDS else [],
               "held-out": held_out if cfg.evaluates_with_pool() else []}
    for split, problems in sampled.items():  # the pool samples these prompts
        for problem in problems:
            length = len(tokenizer(task.prompt(problem)).input_ids) + cfg.sampling.max_new_tokens
            if length > limit:
                raise ConfigError(f"{split} problem {problem.uid}: its prompt and sampling.max_new_tokens "
                                  f"({cfg.sampling.max_new_tokens}) make {length} tokens, above the model's {limit}: "
                                  "lower sampling.max_new_tokens")


def choose_resume(cfg: RunConfig, run_dir: str) -> ckpt.ResumePlan:
    """The checkpoint to resume from, chosen once here (each one's files hashed once, not per rank
    and per retry): the newest that verifies, trained under the same training fields."""
    plan = ckpt.plan_resume(run_dir)
    if plan.path is not None:
        check_resumable(ckpt.verify_checkpoint(plan.path, hashes=False).manifest, cfg, run_dir)
    return plan


# ---------------------------------------------------------------------------------------------
# The workers
# ---------------------------------------------------------------------------------------------


def train_loop(loop_config: dict[str, Any]) -> None:
    """What every Ray Train worker runs."""
    import ray.train
    import torch

    from passn.collective import TorchDistributed
    from trainer.loop import train

    cfg = RunConfig.model_validate(loop_config["config"])
    sweep_stale()  # on this node: e.g. the folders of a worker killed in the attempt before this one
    torch.set_num_threads(cfg.resources.threads_per_worker)
    device = ray.train.torch.get_device()
    train(cfg, loop_config["run_dir"], TorchDistributed(device), device, report=ray.train.report,
          resume=ckpt.ResumePlan(**loop_config["resume"]))


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


# the config's local paths (its data, the model folder), relative to where a run or sweep starts
PATH_FIELDS = ("task.train_path", "task.test_path", "model.path")


def relative_paths_made_absolute(cfg: RunConfig) -> dict[str, str]:
    """``{field: ABSOLUTE}`` for each of the config's relative local paths: Ray workers and Tune
    trials run in their own working directories, where a relative path names nothing."""
    out = {}
    for field in PATH_FIELDS:
        section, name = field.split(".")
        path = getattr(getattr(cfg, section), name)
        if path and absolute_path(path) != path:
            out[field] = absolute_path(path)
    return out


def absolute_path_overrides(cfg: RunConfig) -> list[str]:
    """``field=ABSOLUTE`` for each of the config's relative local paths (as a sweep's overrides)."""
    return [f"{field}={path}" for field, path in relative_paths_made_absolute(cfg).items()]


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its relative local paths made absolute."""
    for field, path in relative_paths_made_absolute(cfg).items():
        section, name = field.split(".")
        cfg = cfg.model_copy(update={section: getattr(cfg, section).model_copy(update={name: path})})
    return cfg


def cpus_per_run(cfg: RunConfig) -> float:
    """The Ray CPUs a training run holds at once: its workers, their sampler actors where they own
    a pool (DCOa, Dr. GRPO, evaluation.sampler) and, for DCOa and Dr. GRPO, their answer checkers
    (a sweep runs as many trials at a time as these fit)."""
    r = cfg.resources
    need = r.num_workers * r.cpus_per_worker
    if cfg.has_sampler_pool():
        need += r.num_workers * r.sampler_actors * r.sampler_cpus
    if cfg.objective.kind in ONLINE_KINDS and cfg.task.kind == "math":  # a VerifierPool actor per worker (0.25 CPU)
        need += r.num_workers * 0.25
    return need


def local_cpus(cfg: RunConfig) -> int:
    """Logical CPUs for an embedded local cluster: the machine's, or enough for the training
    workers plus their sampler actors (Ray's CPUs are a scheduling count, not a pinning)."""
    return max(2, os.cpu_count() or 2, math.ceil(cpus_per_run(cfg)))


def run_training(cfg: RunConfig, run_dir: str, address: str | None = None) -> list[dict[str, Any]]:
    """Train ``cfg`` into ``run_dir`` on a Ray cluster (local when ``address`` is None); returns the
    per-step metrics."""
    from ray.train import FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # Ray workers run in their own working directories: relative local paths must be made absolute
    run_dir = absolute_path(run_dir)
    cfg = with_absolute_paths(cfg)
    check_before_training(cfg, run_dir)
    resume = choose_resume(cfg, run_dir)
    fs, root = fsspec.core.url_to_fs(run_dir)
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root}/config.yaml", "w") as f:
        f.write(to_yaml(cfg))
    sweep_stale()  # scratch folders of runs killed before they could remove them
    # Ray Train's own storage (passn keeps nothing there): removed after Ray shuts down
    with scratch("ray") as storage, ray_session(address, log_to_driver=True, num_cpus=local_cpus(cfg)):
        r = cfg.resources
        use_gpu = r.gpus_per_worker > 0
        resources = {"CPU": r.cpus_per_worker, **({"GPU": cfg.gpus_per_training_worker()} if use_gpu else {})}
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"config": cfg.model_dump(mode="json"), "run_dir": run_dir,
                               "resume": dataclasses.asdict(resume)},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=600),
            scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=RayRunConfig(name="train", storage_path=str(storage),
                                    failure_config=FailureConfig(max_failures=r.max_failures)),
        )
        trainer.fit()
    return read_metrics(run_dir)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML configuration (local or s3://)")
    parser.add_argument("--run-dir", required=True, help="where checkpoints, metrics and evaluations go (local or s3://)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. objective.budget=64 (repeatable)")
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")


def main_with_args(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.set)
        run_training(cfg, args.run_dir, args.address)
    except (ConfigError, DataError, ckpt.CheckpointError, ValueError) as exc:
        print(f"passn train: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="passn train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return main_with_args(parser.parse_args(argv))


if __name__ == "__main__":
    # Run through the importable module, not __main__: Ray pickles functions of __main__ by value
    # together with everything they reach, and fails on objects deep inside some libraries.
    from jobs.train import main as _main

    sys.exit(_main())
