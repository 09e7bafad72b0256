"""`passn train CONFIG --run-dir DIR`: fine-tune with CE, DCO or DCOstep on Ray Train + DeepSpeed.

A Ray Train ``TorchTrainer`` runs :func:`train_loop` on every worker. The loop is one story on
every device (CPU with gloo, CUDA with NCCL): build model and engine; for each step take
candidates, weigh them, refill to exactly ``optim.sequences_per_step`` sequences, forward,
backward, step, report; at each epoch end evaluate exactly and checkpoint. A run directory that
already holds checkpoints is resumed from the newest one whose manifest verifies, also when Ray
Train's FailureConfig restarts a failed worker group.

    passn train configs/tiny.yaml --run-dir runs/ce
    passn train configs/tiny.yaml --run-dir runs/dco --set objective.kind=dco --set objective.budget=64
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch

from jobs.cluster import absolute_path, ray_session
from passn import checkpoint as ckpt
from passn import evaluation, objectives
from passn.config import (ConfigError, RunConfig, config_hash, load_config, to_yaml, training_differences,
                          training_fields, training_hash)
from passn.data import CandidateStream, Example, collate, encode_examples, refill
from passn.models import load_model, load_tokenizer, write_model_folder
from passn.tasks import DataError, MathTask, SyntheticTask, Task

FAULT_ENV = "PASSN_FAULT_KILL_RANK_AT_STEP"  # fault injection for tests: "RANK:STEP"


# ---------------------------------------------------------------------------------------------
# Task and data (also used by the driver to fail before any training)
# ---------------------------------------------------------------------------------------------


def build_task(cfg: RunConfig, run_dir: str | None = None) -> Task:
    t = cfg.task
    if t.kind == "synthetic":
        s = t.synthetic
        return SyntheticTask(seed=t.seed, variant=t.variant, num_train=s.num_train, num_test=s.num_test,  # type: ignore[arg-type]
                             question_length=s.question_length, num_letters=s.num_letters, beta=s.beta)
    if t.kind == "coq":
        from passn.proof_steps import proof_step_task

        return proof_step_task(cfg)
    return MathTask(t.train_path, t.test_path, template=t.variant, max_bad_fraction=t.max_bad_fraction,
                    rejects_dir=run_dir, mode=t.answer_check)


def held_out_problems(task: Task, cfg: RunConfig) -> list:
    """The test split, or none for a MATH run configured without one (no epoch-end evaluation)."""
    try:
        return task.problems("test")
    except DataError:
        if cfg.task.kind in ("math", "coq"):
            return []
        raise


def check_before_training(cfg: RunConfig, run_dir: str) -> None:
    """Everything that can fail on bad input, checked in the driver before workers start."""
    if cfg.objective.whole_proof and cfg.resources.zero_stage == 3 and cfg.resources.backend == "deepspeed":
        raise ConfigError("objective.whole_proof forwards each worker's proofs without gradients, a different number "
                          "of batches per worker, which ZeRO-3's collective forwards cannot do: use zero_stage <= 2")
    if cfg.objective.whole_proof and cfg.task.kind != "coq":
        raise ConfigError("objective.whole_proof needs a task made of proofs (the Coq task); the "
                          f"{cfg.task.kind} task has single-step examples: set objective.whole_proof = false")
    task = build_task(cfg, run_dir)
    tokenizer, limit = load_tokenizer(cfg.model)  # the driver never loads the weights
    for problems in (task.problems("train"), held_out_problems(task, cfg)):
        encode_examples(tokenizer, task, problems, limit)
    if cfg.objective.kind in ("dcoa", "dr_grpo"):  # the pool samples every training prompt
        for problem in task.problems("train"):
            length = len(tokenizer(task.render_prompt(problem)).input_ids) + cfg.sampling.max_new_tokens
            if length > limit:
                raise ConfigError(f"training problem {problem.uid}: its prompt and sampling.max_new_tokens "
                                  f"({cfg.sampling.max_new_tokens}) make {length} tokens, above the model's {limit}: "
                                  "lower sampling.max_new_tokens")


# ---------------------------------------------------------------------------------------------
# Engines: DeepSpeed (default) or torch DDP, behind one small interface
# ---------------------------------------------------------------------------------------------


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


def _lr_lambda(warmup_steps: int):
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


class DeepSpeedEngine:
    def __init__(self, model, cfg: RunConfig, micro_batches: int, device: torch.device) -> None:
        import deepspeed

        o = cfg.optim
        # a torch optimizer (not DeepSpeed's own) avoids building DeepSpeed's CPU Adam op on CPU;
        # on CUDA the fused kernel is what DeepSpeed's FusedAdam would run
        optimizer = torch.optim.AdamW(model.parameters(), lr=o.learning_rate, betas=o.betas,
                                      weight_decay=o.weight_decay, eps=1e-8, fused=device.type == "cuda")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(o.warmup_steps))
        low_precision = device.type == "cuda" and cfg.model.dtype != "float32"
        autocast = low_precision and cfg.resources.mixed_precision == "torch_autocast"
        bf16 = low_precision and not autocast
        import torch.distributed as dist

        self.zero_stage = cfg.resources.zero_stage
        if self.zero_stage == 2 and dist.is_initialized() and dist.get_world_size() == 1:
            # one rank: stage 2's gradient partitioning divides nothing but costs its bucketing
            # (measured 0.83x against 0.97x for stage 1 on an H200, 1B model); same numerics
            self.zero_stage = 1
        zero: dict[str, Any] = {"stage": self.zero_stage}
        if self.zero_stage >= 2:
            # large buckets and contiguous gradients: fewer, bigger reduce-scatters
            zero.update(overlap_comm=device.type == "cuda", contiguous_gradients=True,
                        reduce_bucket_size=int(5e8), allgather_bucket_size=int(5e8))
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,  # passn forms micro-batches itself
            "gradient_accumulation_steps": micro_batches,
            "zero_optimization": zero,
            "gradient_clipping": o.max_grad_norm,
            "bf16": {"enabled": bf16},
            # bf16 gradients accumulate into fp32 (across micro-batches and ranks' buckets); at
            # stage 1 DeepSpeed then steps with its BF16_Optimizer, whose inf/nan check reuses the
            # gradient norm instead of scanning every gradient with a host sync. On an H200 (1B
            # model) passn's step went from 0.94x to 1.01x of a plain PyTorch loop (README).
            **({"data_types": {"grad_accum_dtype": "fp32"}} if bf16 else {}),
            "torch_autocast": {"enabled": autocast, "dtype": "bfloat16"},
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        self.module = self.engine.module

    def forward(self, **kwargs):
        return self.engine(**kwargs)

    def backward_and_step(self, loss: torch.Tensor) -> None:
        # passn already divides by the step's sequence count: no second division by GAS
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save_state(self, local_dir: str) -> None:
        self.engine.save_checkpoint(local_dir, tag="state", save_latest=False)

    def load_state(self, local_dir: str) -> None:
        path, _ = self.engine.load_checkpoint(local_dir, tag="state", load_module_strict=True)
        if path is None:  # DeepSpeed only warns when nothing was found
            raise ckpt.CheckpointError(f"DeepSpeed found no training state in {local_dir}")


class DDPEngine:
    def __init__(self, model, cfg: RunConfig, micro_batches: int, device: torch.device) -> None:
        from torch.nn.parallel import DistributedDataParallel

        o = cfg.optim
        model.to(device)
        self.module = model
        self.engine = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=o.learning_rate, betas=o.betas,
                                           weight_decay=o.weight_decay, eps=1e-8)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(o.warmup_steps))
        self.micro_batches, self.max_grad_norm = micro_batches, o.max_grad_norm
        self._micro = 0

    def forward(self, **kwargs):
        return self.engine(**kwargs)

    def backward_and_step(self, loss: torch.Tensor) -> None:
        loss.backward()
        self._micro += 1
        if self._micro == self.micro_batches:
            if self.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self._micro = 0

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save_state(self, local_dir: str) -> None:
        import torch.distributed as dist

        if dist.get_rank() == 0:  # DDP replicates everything: one copy suffices
            Path(local_dir).mkdir(parents=True, exist_ok=True)
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       f"{local_dir}/optimizer.pt")

    def load_state(self, local_dir: str) -> None:
        from safetensors.torch import load_file

        state = torch.load(f"{local_dir}/optimizer.pt", weights_only=True)  # written by this run only
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        weights = load_file(f"{Path(local_dir).parent}/model/model.safetensors")
        self.module.load_state_dict(weights, strict=False)


# ---------------------------------------------------------------------------------------------
# Run-directory side effects: metrics, TensorBoard, RNG
# ---------------------------------------------------------------------------------------------


class MetricsSink:
    """metrics.jsonl and TensorBoard events, staged locally and copied to the run dir on flush."""

    def __init__(self, run_dir: str) -> None:
        from tensorboardX import SummaryWriter

        self.run_dir = run_dir.rstrip("/")
        self.local = Path(tempfile.mkdtemp(prefix="passn-metrics-"))
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


def rng_state() -> dict[str, Any]:
    py = random.getstate()
    return {"python": [py[0], list(py[1]), py[2]], "numpy": np.random.get_state()[1].tolist(),
            "numpy_pos": int(np.random.get_state()[2]), "torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------
# The training loop (runs on every Ray Train worker)
# ---------------------------------------------------------------------------------------------


def fault_marker(run_dir: str) -> Path:
    """Where an injected fault records that it fired (so the retried run does not fire it again)."""
    return Path(tempfile.gettempdir()) / f"passn-fault-{hashlib.sha256(run_dir.encode()).hexdigest()[:12]}"


def per_sequence_loss(cfg: RunConfig, token_logp_BT, mask_BT, values_B=None, kind: str | None = None):
    """(loss_B, weight_B) of ``kind`` (default: the configured objective). ``values_B``: numbers
    fixed before the step: the DCOa weight F(N', p_MC), the Dr. GRPO advantage."""
    kind, norm = kind or cfg.objective.kind, cfg.objective.ce_normalisation
    if kind == "dcoa" or (kind == "dco_step" and cfg.objective.whole_proof):
        return objectives.weighted_ce_loss(token_logp_BT, mask_BT, values_B, norm), values_B
    if kind == "dr_grpo":  # -A_i sum_t log p; summed over a step's rollouts / rollouts = mean over prompts of -J
        loss_B = objectives.dr_grpo_loss(token_logp_BT, mask_BT, values_B, group_size=1)
        return loss_B, torch.ones_like(loss_B, dtype=torch.float64)
    if kind == "ce":
        loss_B = objectives.ce_loss(token_logp_BT, mask_BT, norm)
        return loss_B, torch.ones_like(loss_B, dtype=torch.float64)
    if kind == "dco":
        return objectives.dco_loss(token_logp_BT, mask_BT, cfg.objective.budget, norm)
    if kind == "dco_step":
        return objectives.dco_step_loss(token_logp_BT, mask_BT, cfg.objective.budget, norm)
    raise ConfigError(f"objective.kind = {kind!r} is not trained by this loop")


def token_logp(engine, batch):
    logits_BTV = engine.forward(input_ids=batch["inputs_BT"], attention_mask=batch["attention_BT"]).logits
    return objectives.token_logprobs(logits_BTV, batch["targets_BT"])


def train_loop(loop_config: dict[str, Any]) -> None:
    import ray.train
    import torch.distributed as dist

    cfg = RunConfig.model_validate(loop_config["config"])
    run_dir: str = loop_config["run_dir"]
    rank, world = dist.get_rank(), dist.get_world_size()
    is_rank0 = rank == 0
    torch.set_num_threads(cfg.resources.threads_per_worker)
    device = ray.train.torch.get_device()
    say = print if is_rank0 else (lambda *a, **k: None)

    # -- model, data, engine -----------------------------------------------------------------
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)
    model, tokenizer = load_model(cfg.model, cfg.seed)
    task = build_task(cfg, run_dir if is_rank0 else None)
    limit = int(model.config.max_position_embeddings)
    train_examples = encode_examples(tokenizer, task, task.problems("train"), limit)
    test_problems = held_out_problems(task, cfg)
    test_examples = encode_examples(tokenizer, task, test_problems, limit)

    per_worker = cfg.optim.sequences_per_step // world
    micro = min(cfg.optim.micro_sequences_per_worker, per_worker)
    micro_batches = per_worker // micro
    engine_cls = DeepSpeedEngine if cfg.resources.backend == "deepspeed" else DDPEngine
    engine = engine_cls(model, cfg, micro_batches, device)
    stream = CandidateStream(len(train_examples), cfg.optim.epochs, cfg.seed)
    steps_total = cfg.optim.epochs * len(train_examples) // cfg.optim.sequences_per_step
    if cfg.objective.kind == "dr_grpo":  # after the CE warm-up a step consumes sequences_per_step / G prompts
        warm = min(cfg.objective.ce_warmup_steps, steps_total)
        prompts_per_step = cfg.optim.sequences_per_step // cfg.objective.group_size
        steps_total = warm + (cfg.optim.epochs * len(train_examples) - warm * cfg.optim.sequences_per_step) // prompts_per_step
    step = 0
    pad = tokenizer.pad_token_id

    # -- resume ------------------------------------------------------------------------------
    resumed = ckpt.newest_valid_checkpoint(run_dir, warn=say)
    if resumed is not None:
        m = resumed.manifest
        check_resumable(m, cfg, run_dir)
        local = Path(tempfile.mkdtemp(prefix="passn-resume-"))
        # this rank's ZeRO shards (stage 2 and 3 name them by rank), the shared state files, the model
        mine = [f for f in m["files"] if f.startswith(("state/", "model/")) and
                ("zero_pp_rank_" not in f or f"zero_pp_rank_{rank}_" in f)]
        ckpt.download_tree(resumed.path, local, only=[*mine, f"rng/rank_{rank}.json"])
        engine.load_state(str(local / "state"))
        set_rng_state(json.loads((local / f"rng/rank_{rank}.json").read_text()))
        shutil.rmtree(local, ignore_errors=True)
        step = m["step"]
        stream.epoch, stream.cursor = m["data_position"]["epoch"], m["data_position"]["cursor"]
        say(f"resuming from step {step} (epoch {stream.progress:.2f}) in {resumed.path}", flush=True)
    sink = MetricsSink(run_dir) if is_rank0 else None

    def all_reduce(values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    # -- checkpoint and evaluation -------------------------------------------------------------
    def save_checkpoint(epoch_end: bool) -> None:
        local = Path(tempfile.mkdtemp(prefix="passn-ckpt-"))
        engine.save_state(str(local / "state"))
        (local / "rng").mkdir()
        (local / "rng" / f"rank_{rank}.json").write_text(json.dumps(rng_state()))
        export_weights(str(local / "model"), here=is_rank0)
        if online is not None:
            online.settle()  # a background draw joins the cache first (collective: every worker is here)
            if is_rank0:
                (local / "online.json").write_text(json.dumps(online.state()))
        remote = ckpt.checkpoint_dir(run_dir, step)
        ckpt.upload_tree(local, remote)
        files: list[dict[str, Any]] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(files, ckpt.digest_tree(local))
        shutil.rmtree(local, ignore_errors=True)
        if is_rank0:
            merged = {k: v for per_rank in files for k, v in per_rank.items()}
            ckpt.write_manifest(remote, merged, step=step, epoch=stream.progress, epoch_end=epoch_end,
                                objective=cfg.objective.model_dump(), config_hash=config_hash(cfg),
                                training_hash=training_hash(cfg), training_fields=training_fields(cfg),
                                data_position=stream.state(), world_size=world)
            ckpt.prune_checkpoints(run_dir, cfg.storage.keep_checkpoints)
            sink.flush()  # type: ignore[union-attr]
        dist.barrier()

    sampled_eval = cfg.task.variant != "direct"

    def export_weights(folder: str, here: bool = True) -> None:
        """The model as a Hugging Face folder, written by this worker if ``here``; every worker
        calls it (ZeRO-3 gathers the parameters first)."""
        if cfg.resources.zero_stage == 3 and cfg.resources.backend == "deepspeed":
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
                if here:
                    write_model_folder(engine.module, tokenizer, folder)
        elif here:
            write_model_folder(engine.module, tokenizer, folder)

    def gather(obj: Any) -> list[Any]:
        out: list[Any] = [None] * world
        dist.all_gather_object(out, obj)
        return out

    # whole-proof DCO: every candidate step is weighed by its whole proof's probability, the product
    # of the probabilities of all the proof's steps in the training data (computed without gradients)
    proof_of: list[str] = [str(p.meta.get("theorem")) for p in task.problems("train")] if cfg.objective.whole_proof else []
    steps_of: dict[str, list[int]] = {}
    for i, proof in enumerate(proof_of):
        steps_of.setdefault(proof, []).append(i)

    def proof_logprobs(proofs: set[str]) -> dict[str, float]:
        ordered = sorted(proofs)
        members = [j for proof in ordered for j in steps_of[proof]]
        engine.module.eval()
        with torch.no_grad():
            logp = evaluation.sequence_logprobs(engine.module, [train_examples[j] for j in members], pad, batch_size=micro)
        engine.module.train()
        out, position = {}, 0
        for proof in ordered:
            out[proof] = float(logp[position : position + len(steps_of[proof])].sum())
            position += len(steps_of[proof])
        return out

    online = None
    if cfg.objective.kind in ("dcoa", "dr_grpo"):
        from jobs.online import OnlineSampler

        online = OnlineSampler(cfg, task, task.problems("train"), tokenizer, lambda: engine.module, export_weights,
                               limit, rank, world, gather)
        if resumed is not None and "online.json" in resumed.manifest["files"]:
            with fsspec.open(f"{resumed.path.rstrip('/')}/online.json", "r") as f:
                online.load_state(json.load(f))

    def evaluate(epoch: int) -> None:
        if not test_examples:
            return
        engine.module.eval()
        shard = list(range(rank, len(test_examples), world))
        logp = evaluation.sequence_logprobs(engine.module, [test_examples[i] for i in shard], pad)
        prompts = [task.render_prompt(test_problems[i]) for i in shard]
        max_new = max(len(e.input_ids) - e.completion_start for e in test_examples) + 1
        greedy = evaluation.greedy_answers(engine.module, tokenizer, prompts, max_new)
        verdicts = task.check_many([test_problems[i] for i in shard], [g[0] for g in greedy])
        rows = [{"uid": test_problems[i].uid, "reference_logp": float(lp), "greedy_answer": g[0],
                 "greedy_confidence": g[1], "greedy_correct": v.correct}
                for i, lp, g, v in zip(shard, logp, greedy, verdicts)]
        if sampled_eval:  # chain of thought: the reference's probability is not pass@k; sample and verify
            counts = evaluation.sampled_correct_counts(
                engine.module, tokenizer, task, [test_problems[i] for i in shard], prompts,
                cfg.evaluation.samples_per_problem, cfg.sampling.temperature, cfg.sampling.max_new_tokens,
                seed=cfg.sampling.seed + 1000 * epoch + rank)
            for row, c in zip(rows, counts):
                row.update(samples=cfg.evaluation.samples_per_problem, correct=c)
        gathered: list[list[dict[str, Any]]] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(gathered, rows)
        engine.module.train()
        if not is_rank0:
            return
        per_problem = sorted((r for part in gathered for r in part), key=lambda r: r["uid"])
        report = evaluation.exact_report(np.array([r["reference_logp"] for r in per_problem]),
                                         [r["greedy_confidence"] for r in per_problem],
                                         [r["greedy_correct"] for r in per_problem], cfg.evaluation.k_grid)
        if sampled_eval:
            report["pass_at_k_reference"] = report["pass_at_k"]  # the reference chain's exact coverage
            report["pass_at_k"] = evaluation.sampled_pass_at_k([r["samples"] for r in per_problem],
                                                               [r["correct"] for r in per_problem],
                                                               cfg.evaluation.k_grid)
            report["estimator"] = "unbiased, from sampled completions"
        report.update(epoch=epoch, step=step, problems=len(per_problem))
        with fsspec.open(f"{run_dir.rstrip('/')}/eval/epoch_{epoch:03d}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in per_problem)
        with fsspec.open(f"{run_dir.rstrip('/')}/eval/epoch_{epoch:03d}.summary.json", "w") as f:
            json.dump(report, f, indent=1)
        passes = " ".join(f"pass@{k} {v:.3f}" for k, v in report["pass_at_k"].items())
        g = report["greedy"]
        print(f"epoch {epoch} | {passes} | greedy acc {g['accuracy']:.3f} conf {g['mean_confidence']:.3f} "
              f"| conf>0.9 {g['fraction_high_confidence']:.3f} (wrong {g['fraction_high_confidence_wrong']:.3f})",
              flush=True)

    # -- the loop --------------------------------------------------------------------------------
    fault = os.environ.get(FAULT_ENV)
    marker = fault_marker(run_dir)
    engine.module.train()
    kind = cfg.objective.kind
    needs_weights_first = kind in ("dco", "dco_step") and cfg.objective.refill_threshold > 0
    last_saved, last_evaluated = step, int(stream.epoch)
    while not stream.finished:
        started = time.perf_counter()
        epoch_before = stream.epoch

        # take candidates and refill to exactly sequences_per_step
        chosen: list[tuple[Example, float]] = []  # (sequence, its fixed per-sequence value)
        dropped = candidates = 0
        looked_at: list = []  # the step's Monte Carlo estimates (dcoa) or rollout groups (dr_grpo)
        warm_up = online is not None and step < cfg.objective.ce_warmup_steps  # CE on the references first
        group = cfg.objective.group_size if kind == "dr_grpo" and not warm_up else 1
        while len(chosen) < cfg.optim.sequences_per_step and not stream.finished:
            need = (cfg.optim.sequences_per_step - len(chosen)) // group  # sequences, or prompts for dr_grpo
            window = stream.peek(cfg.optim.sequences_per_step // group)
            threshold = cfg.objective.refill_threshold
            if kind == "dcoa" and not warm_up:
                estimates = online.estimates(window, step)  # type: ignore[union-attr]
                weights = objectives.dcoa_weights(torch.tensor([e.correct for e in estimates]),
                                                  torch.tensor([e.samples for e in estimates]),
                                                  cfg.objective.budget).tolist()
            elif kind == "dr_grpo" and not warm_up:
                groups = online.groups(window, step)  # type: ignore[union-attr]
                rewards = torch.tensor([[r.reward for r in g] for g in groups])
                weights = objectives.balanced_groups(rewards).double().tolist()  # batch balancing
                threshold = 1.0
            elif cfg.objective.whole_proof:  # F(N, prod of the step probabilities of the candidate's proof)
                local = window[rank::world]
                proof_logp = proof_logprobs({proof_of[i] for i in local})
                w_local = objectives.coverage_weight_from_logp(
                    cfg.objective.budget, torch.tensor([proof_logp[proof_of[i]] for i in local], dtype=torch.float64))
                weights = [0.0] * len(window)
                for r, part in enumerate(gather(w_local.tolist())):
                    weights[r::world] = part
            elif needs_weights_first:
                local = window[rank::world]
                with torch.no_grad():
                    weights_local = []
                    for start in range(0, len(local), micro):
                        batch = {k: v.to(device) for k, v in collate([train_examples[i] for i in local[start:start + micro]], pad).items()}
                        seq_logp = objectives.sequence_logprob(token_logp(engine, batch).double(), batch["mask_BT"])
                        weights_local.append(objectives.dco_weights(seq_logp, cfg.objective.budget))
                    w_local = torch.cat(weights_local) if weights_local else torch.zeros(0, dtype=torch.float64)
                gathered: list[list[float]] = [None] * world  # type: ignore[list-item]
                dist.all_gather_object(gathered, w_local.tolist())
                weights = [0.0] * len(window)
                for r in range(world):
                    weights[r::world] = gathered[r]
            else:
                weights = [1.0] * len(window)
            outcome = refill(weights, threshold, need)
            if kind == "dr_grpo" and not warm_up:
                for p in outcome.chosen:
                    prompt = train_examples[window[p]].input_ids[: train_examples[window[p]].completion_start]
                    advantages = objectives.group_advantages(rewards[p : p + 1])[0].tolist()
                    chosen += [(Example(f"{train_examples[window[p]].uid}#{j}", prompt + r.token_ids, len(prompt)), a)
                               for j, (r, a) in enumerate(zip(groups[p], advantages))]
            else:
                fixed = kind == "dcoa" or cfg.objective.whole_proof  # weights fixed before the step
                chosen += [(train_examples[window[p]], weights[p] if fixed else 1.0) for p in outcome.chosen]
            if kind == "dcoa" and not warm_up:
                looked_at += estimates[: outcome.consumed]
            elif kind == "dr_grpo" and not warm_up:
                looked_at += groups[: outcome.consumed]
            dropped += outcome.dropped
            candidates += outcome.consumed
            stream.advance(outcome.consumed)
        if online is not None and not warm_up:  # staleness 1: the next step's candidates, sampled while this one trains
            online.prefetch(stream.peek(cfg.optim.sequences_per_step // group), step)
        if len(chosen) < cfg.optim.sequences_per_step:
            say(f"the last epoch leaves {len(chosen)} candidates, fewer than optim.sequences_per_step = "
                f"{cfg.optim.sequences_per_step}: they are not trained", flush=True)
            if last_evaluated < cfg.optim.epochs:
                evaluate(cfg.optim.epochs)
                last_evaluated = cfg.optim.epochs
            if last_saved != step:
                save_checkpoint(epoch_end=True)
                last_saved = step
            break

        # forward, backward, step on this worker's share
        mine = chosen[rank * per_worker : (rank + 1) * per_worker]
        loss_sum = weight_sum = tokens = 0.0
        weight_min = math.inf
        train_started = time.perf_counter()
        for start in range(0, per_worker, micro):
            part = mine[start : start + micro]
            batch = {k: v.to(device) for k, v in collate([e for e, _ in part], pad).items()}
            values_B = torch.tensor([v for _, v in part], dtype=torch.float64, device=device)
            loss_B, weight_B = per_sequence_loss(cfg, token_logp(engine, batch), batch["mask_BT"], values_B,
                                                  kind="ce" if warm_up else kind)
            engine.backward_and_step(loss_B.sum() / per_worker)
            loss_sum += float(loss_B.detach().sum())
            weight_sum += float(weight_B.sum())
            weight_min = min(weight_min, float(weight_B.min()))
            tokens += float(batch["attention_BT"].sum())
        train_s = time.perf_counter() - train_started
        step += 1
        if fault and fault == f"{rank}:{step}" and not marker.exists():
            marker.touch()
            os._exit(17)  # fault injection: this worker dies mid-run
        loss_sum, weight_sum, tokens, sequences = all_reduce([loss_sum, weight_sum, tokens, len(mine)])
        (weight_min,) = all_reduce([weight_min], op=dist.ReduceOp.MIN)
        elapsed = time.perf_counter() - started
        row = {"step": step, "epoch": round(stream.progress, 4), "loss": loss_sum / sequences,
               "weight_mean": weight_sum / sequences, "weight_min": weight_min, "dropped": dropped,
               "sequences": int(sequences), "tokens_per_s": tokens / elapsed, "lr": engine.lr,
               "candidates": candidates, "step_s": elapsed}
        assert row["sequences"] == cfg.optim.sequences_per_step
        if online is not None:
            row.update(_online_metrics(online, gather, looked_at, step - 1, train_s, device))
            online.forget(step)
        if is_rank0:
            extra = "" if online is None else (
                f" | sampled {row.get('sampled_tokens', 0):,.0f} tok in {row.get('sample_s', 0):.2f} s"
                f" (+{row.get('sample_overlapped_s', 0):.2f} s overlapped) | train {train_s:.2f} s"
                f" | policy_v {row.get('policy_v', row.get('pool_version', '-'))} staleness {row.get('staleness', 0)}"
                + (f" | p_mc {row['p_mc_mean']:.3f} [{row['p_mc_min']:.2f}, {row['p_mc_max']:.2f}]" if "p_mc_mean" in row else "")
                + (f" | reward {row['reward_mean']:.3f}" if "reward_mean" in row else ""))
            say(f"step {step}/{steps_total} | epoch {row['epoch']:.2f} | loss {row['loss']:.4f} | "
                f"weight_mean {row['weight_mean']:.3f} | weight_min {row['weight_min']:.3f} | dropped {dropped} | "
                f"tok/s {row['tokens_per_s']:,.0f} | lr {row['lr']:.2e}{extra}", flush=True)
            sink.log(row)  # type: ignore[union-attr]
        epoch_end = stream.epoch > epoch_before
        last_epoch = epoch_before + 1 >= cfg.optim.epochs
        if epoch_end and ((epoch_before + 1) % cfg.evaluation.every_epochs == 0 or last_epoch):
            evaluate(epoch_before + 1)
            last_evaluated = epoch_before + 1
        every = cfg.storage.checkpoint_every_steps
        epoch_checkpoint = epoch_end and ((epoch_before + 1) % cfg.storage.checkpoint_every_epochs == 0 or last_epoch)
        if epoch_checkpoint or (every and step % every == 0) or stream.finished:
            save_checkpoint(epoch_end)
            last_saved = step
            # Ray's own record of progress: once per checkpoint (a report costs about a second)
            ray.train.report({k: v for k, v in row.items() if isinstance(v, (int, float))})
    if online is not None:
        online.close()
    if sink is not None:
        sink.close()


def _online_metrics(online, gather, looked_at, trainer_version: int, train_s: float, device) -> dict[str, Any]:
    """The sampling side of a step, combined over workers: seconds and sync checks as the slowest
    worker saw them, the p_MC distribution of the candidates looked at, staleness."""
    from passn.online import Estimate, p_mc_summary

    parts = gather(online.take_metrics())
    out: dict[str, Any] = dict(parts[0])
    for key in ("sync_s", "sync_logp_gap"):
        values = [p[key] for p in parts if key in p]
        if values:
            out[key] = max(values)
    out["train_s"] = max(gather(train_s))
    if looked_at and isinstance(looked_at[0], list):  # dr_grpo: reward and version of every rollout looked at
        out.update(p_mc_summary([Estimate(int(sum(r.reward for r in g)), len(g), g[0].version) for g in looked_at],
                                trainer_version, name="reward"))
    else:
        out.update(p_mc_summary(looked_at, trainer_version))
    if device.type == "cuda":
        out["gpu_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        if online.pool is not None and online.pending is None:  # (a state() call would queue behind the prefetch)
            out["sampler_gpu_peak_gb"] = max(online.pool.gpu_peak_bytes() or [0]) / 2**30
    return out


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


def local_cpus(cfg: RunConfig) -> int:
    """Logical CPUs for an embedded local cluster: the machine's, or enough for the training
    workers plus their sampler actors (Ray's CPUs are a scheduling count, not a pinning)."""
    r = cfg.resources
    need = r.num_workers * r.cpus_per_worker
    if cfg.objective.kind in ("dcoa", "dr_grpo"):
        need += r.num_workers * r.sampler_actors * r.sampler_cpus
        if cfg.task.kind == "math":  # a VerifierPool actor per worker
            need += r.num_workers * 0.25
    return max(2, os.cpu_count() or 2, math.ceil(need))


def run_training(cfg: RunConfig, run_dir: str, address: str | None = None) -> list[dict[str, Any]]:
    """Train ``cfg`` into ``run_dir`` on a Ray cluster (local when ``address`` is None); returns the
    per-step metrics."""
    from ray.train import FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # Ray workers run in their own working directories: relative local paths must be made absolute
    run_dir = absolute_path(run_dir)
    cfg = cfg.model_copy(update={"task": cfg.task.model_copy(update={
        "train_path": absolute_path(cfg.task.train_path), "test_path": absolute_path(cfg.task.test_path)})})
    if cfg.model.path:
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": absolute_path(cfg.model.path)})})
    check_before_training(cfg, run_dir)
    fs, root = fsspec.core.url_to_fs(run_dir)
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root}/config.yaml", "w") as f:
        f.write(to_yaml(cfg))
    with ray_session(address, log_to_driver=True, num_cpus=local_cpus(cfg)):
        r = cfg.resources
        use_gpu = r.gpus_per_worker > 0
        resources = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if use_gpu else {})}
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"config": cfg.model_dump(mode="json"), "run_dir": run_dir},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=600),
            scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=RayRunConfig(name="train", storage_path=tempfile.mkdtemp(prefix="passn-ray-"),
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
