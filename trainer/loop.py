"""The training loop of one worker, three levels deep: the run, a step, a micro-batch.

    train(cfg, run_dir, collective, device)   build; for each step: batch, step, log, evaluate, checkpoint
      train_step(engine, batch, micro)        this worker's share of the batch, one optimizer step
        forward_backward(engine, batch, ...)  one micro-batch: log-probs, coefficients, weighted CE, backward

The loop never asks which objective it trains: the batch source (``passn.batches``) decides the
sequences and their coefficients, and every step is the same weighted cross-entropy. It runs the
same under Ray Train (``jobs/train.py``, one call per worker, ``TorchDistributed``) and in one
plain process (``OneProcess``: the unit tests).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from passn import checkpoint as ckpt
from passn import faults, objectives
from passn.batches import ONLINE_KINDS, BatchSource, TrainBatch, make_batches, steps_total, weighted_loss
from passn.collective import Collective
from passn.config import RunConfig
from passn.data import CandidateStream, Example, collate, encode_examples
from passn.models import load_model
from passn.tasks import build_task, held_out_problems
from trainer.engines import make_engine
from trainer.evaluation import EpochEvaluation
from trainer.state import MetricsSink, TrainingState

FAULT_ENV = faults.KILL_RANK_ENV  # fault injection for tests: "RANK:STEP"


def fault_marker(run_dir: str) -> Path:
    """Where an injected fault records that it fired (so the retried run does not fire it again)."""
    return Path(tempfile.gettempdir()) / f"passn-fault-{hashlib.sha256(run_dir.encode()).hexdigest()[:12]}"


# ---------------------------------------------------------------------------------------------
# Micro-batch and step
# ---------------------------------------------------------------------------------------------


def token_logp(engine, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    logits_BTV = engine.forward(input_ids=tensors["inputs_BT"], attention_mask=tensors["attention_BT"]).logits
    return objectives.token_logprobs(logits_BTV, tensors["targets_BT"])


def forward_backward(engine, batch: TrainBatch, start: int, stop: int, divisor: int, pad: int,
                     device: torch.device) -> tuple[float, float, float, float]:
    """Back-propagate sum_i c_i l_CE(i) / ``divisor`` over sequences [start, stop) of ``batch``;
    returns (sum of c_i l_CE, sum of c_i, min c_i, tokens)."""
    tensors = {k: v.to(device) for k, v in collate(batch.examples[start:stop], pad).items()}
    loss_B, coefficient_B = weighted_loss(token_logp(engine, tensors), tensors["mask_BT"], batch.coefficients, start,
                                          batch.normalisation)
    # local SUM / this worker's sequences; the engines average gradients over workers: (1/S) sum_i c_i l_CE(i)
    engine.backward_and_step(loss_B.sum() / divisor)
    return (float(loss_B.detach().sum()), float(coefficient_B.sum()), float(coefficient_B.min()),
            float(tensors["attention_BT"].sum()))


def train_step(engine, share: TrainBatch, micro: int, pad: int, device: torch.device) -> dict[str, float]:
    """One optimizer step on this worker's ``share`` of the batch, in micro-batches of ``micro``.

    Each worker divides its local SUM by its own sequence count and the engines average gradients
    over workers, so the step's gradient is (1/S) sum_i c_i grad l_CE(i) over all S sequences,
    whatever the number of workers and micro-batches."""
    total = {"loss_sum": 0.0, "weight_sum": 0.0, "weight_min": math.inf, "tokens": 0.0}
    started = time.perf_counter()
    for start in range(0, len(share.examples), micro):
        loss, weight, weight_min, tokens = forward_backward(engine, share, start, start + micro, len(share.examples),
                                                            pad, device)
        total["loss_sum"] += loss
        total["weight_sum"] += weight
        total["weight_min"] = min(total["weight_min"], weight_min)
        total["tokens"] += tokens
    return {**total, "sequences": float(len(share.examples)), "train_s": time.perf_counter() - started}


def scorer(engine, pad: int, batch_size: int, device: torch.device) -> Callable[[Sequence[Example]], np.ndarray]:
    """log p(completion | prompt) of examples under the engine's current weights, no gradients
    (what a batch source weighs candidates with before the step)."""

    def score(examples: Sequence[Example]) -> np.ndarray:
        out = []
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                tensors = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad).items()}
                out.append(objectives.sequence_logprob(token_logp(engine, tensors).double(), tensors["mask_BT"]).cpu())
        return torch.cat(out).numpy() if out else np.zeros(0)

    return score


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """What one worker's loop works with, built by :func:`build`."""

    cfg: RunConfig
    collective: Collective
    device: torch.device
    engine: Any
    batches: BatchSource
    state: TrainingState
    evaluate: EpochEvaluation
    stream: CandidateStream
    micro: int
    pad: int
    total_steps: int
    sampler: Any = None
    policy: Any = None  # the worker's sampler pool (the sampler's, or the evaluations' own)
    sink: MetricsSink | None = None

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
        elif self.policy is not None:
            self.policy.close()
        if self.sink is not None:
            self.sink.close()


def build(cfg: RunConfig, run_dir: str, collective: Collective, device: torch.device, say=print,
          resume: ckpt.ResumePlan | None = None) -> Run:
    """Model, data, engine, batch source and training state, resumed from the driver's choice
    (``resume``; without one, from the newest valid checkpoint)."""
    rank, world = collective.rank, collective.world
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)
    model, tokenizer = load_model(cfg.model, cfg.seed)
    task = build_task(cfg, run_dir if rank == 0 else None, tokenizer)
    limit = int(model.config.max_position_embeddings)
    train_problems = task.problems("train")
    examples = encode_examples(tokenizer, task, train_problems, limit)
    test_problems = held_out_problems(task, cfg)
    test_examples = encode_examples(tokenizer, task, test_problems, limit)

    per_worker, pad = cfg.optim.sequences_per_step // world, tokenizer.pad_token_id
    micro = min(cfg.optim.micro_sequences_per_worker, per_worker)
    engine = make_engine(model, cfg, per_worker // micro, device)
    stream = CandidateStream(len(examples), cfg.optim.epochs, cfg.seed)
    sampler = policy = None
    if cfg.objective.kind in ONLINE_KINDS:
        from trainer.sampler_client import OnlineSampler

        sampler = OnlineSampler(cfg, task, train_problems, tokenizer, engine, limit, collective)
        policy = sampler.policy
    elif cfg.evaluates_with_pool():  # a pool for the evaluations alone
        from trainer.policy_pool import PolicyPool

        policy = PolicyPool(cfg, tokenizer, engine, limit, rank, task.prompt((test_problems or train_problems)[0]))
    evaluate = EpochEvaluation(cfg, run_dir, task, tokenizer, test_problems, test_examples, collective,
                               policy=policy if cfg.evaluates_with_pool() else None,
                               settle=sampler.settle if sampler is not None else None)
    proofs = [str(p.meta.get("theorem")) for p in train_problems] if cfg.objective.whole_proof else None
    batches = make_batches(cfg, examples, stream, collective=collective, scorer=scorer(engine, pad, micro, device),
                           sampler=sampler, proof_of=proofs)
    sink = MetricsSink(run_dir) if rank == 0 else None
    state = TrainingState(cfg, run_dir, engine, tokenizer, batches, collective, sink)
    state.restore(say, resume)
    return Run(cfg, collective, device, engine, batches, state, evaluate, stream, micro, pad,
               steps_total(cfg, len(examples)), sampler, policy, sink)


def train(cfg: RunConfig, run_dir: str, collective: Collective, device: torch.device,
          report: Callable[[dict[str, Any]], None] | None = None, resume: ckpt.ResumePlan | None = None) -> None:
    """Train ``cfg`` into ``run_dir`` on this worker (resuming from the driver's choice ``resume``).
    ``report``: called with the step's numbers at each checkpoint (Ray Train's own record)."""
    say = print if collective.rank == 0 else (lambda *a, **k: None)
    run = build(cfg, run_dir, collective, device, say, resume)
    state, stream, size = run.state, run.stream, cfg.optim.sequences_per_step
    last_saved, last_evaluated = state.step, int(stream.epoch)
    run.engine.module.train()
    try:
        if cfg.evaluation.at_start and state.step == 0:  # the starting weights, as epoch 0
            run.evaluate(run.engine.module, 0, 0)
        while not stream.finished:
            started, epoch_before = time.perf_counter(), stream.epoch
            batch = run.batches.next_batch(state.step)
            if len(batch.examples) < size:  # the end of the last epoch: evaluate and save what is not yet
                say(f"the last epoch leaves {len(batch.examples)} candidates, fewer than optim.sequences_per_step = "
                    f"{size}: they are not trained", flush=True)
                if last_evaluated < cfg.optim.epochs:
                    run.evaluate(run.engine.module, cfg.optim.epochs, state.step)
                if last_saved != state.step:
                    state.save(epoch_end=True)
                break

            done = train_step(run.engine, batch.share(collective.rank, collective.world), run.micro, run.pad, device)
            state.step += 1
            _maybe_inject_fault(run_dir, collective.rank, state.step)
            row = _step_row(collective, done, batch, state.step, stream, run.engine, time.perf_counter() - started)
            row.update(run.batches.report(batch, state.step))
            if device.type == "cuda":
                row["gpu_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            assert row["sequences"] == size
            say(step_line(row, run.total_steps), flush=True)
            if run.sink is not None:
                run.sink.log(row)

            # -- epoch-end evaluation and checkpoints ------------------------------------------------
            epoch_end, last_epoch = stream.epoch > epoch_before, epoch_before + 1 >= cfg.optim.epochs
            if epoch_end and ((epoch_before + 1) % cfg.evaluation.every_epochs == 0 or last_epoch):
                run.evaluate(run.engine.module, epoch_before + 1, state.step)
                last_evaluated = epoch_before + 1
            every = cfg.storage.checkpoint_every_steps
            if ((epoch_end and ((epoch_before + 1) % cfg.storage.checkpoint_every_epochs == 0 or last_epoch))
                    or (every and state.step % every == 0) or stream.finished):
                state.save(epoch_end)
                last_saved = state.step
                if report is not None:  # once per checkpoint (a Ray Train report costs about a second)
                    report({k: v for k, v in row.items() if isinstance(v, (int, float))})
    except BaseException:
        # what failed is the error to see: a close that fails too (the metrics' last copy to a run dir
        # whose storage is down) is said, not raised over it
        try:
            run.close()
        except Exception as exc:  # noqa: BLE001
            say(f"warning: closing the run after the error below failed too: {exc}", flush=True)
        raise
    run.close()


def _maybe_inject_fault(run_dir: str, rank: int, step: int) -> None:
    fault = os.environ.get(FAULT_ENV)
    marker = fault_marker(run_dir)
    if fault and fault == f"{rank}:{step}" and not marker.exists():
        marker.touch()
        os._exit(17)  # fault injection: this worker dies mid-run


def _step_row(collective: Collective, done: dict[str, float], batch: TrainBatch, step: int, stream: CandidateStream,
              engine, elapsed: float) -> dict[str, Any]:
    """The step's numbers over all workers (two collectives)."""
    loss_sum, weight_sum, tokens, sequences = collective.sum(
        [done["loss_sum"], done["weight_sum"], done["tokens"], done["sequences"]])
    weight_min, neg_train_s = collective.min([done["weight_min"], -done["train_s"]])
    return {"step": step, "epoch": round(stream.progress, 4), "loss": loss_sum / sequences,
            "weight_mean": weight_sum / sequences, "weight_min": weight_min, "dropped": batch.dropped,
            "sequences": int(sequences), "tokens_per_s": tokens / elapsed, "lr": engine.lr,
            "candidates": batch.candidates, "step_s": elapsed, "train_s": -neg_train_s}


def step_line(row: dict[str, Any], total: int) -> str:
    """The one log line of a step (the sampling part when the step sampled)."""
    line = (f"step {row['step']}/{total} | epoch {row['epoch']:.2f} | loss {row['loss']:.4f} | "
            f"weight_mean {row['weight_mean']:.3f} | weight_min {row['weight_min']:.3f} | dropped {row['dropped']} | "
            f"tok/s {row['tokens_per_s']:,.0f} | lr {row['lr']:.2e}")
    if "pool_version" in row or "sampled_tokens" in row:
        line += (f" | sampled {row.get('sampled_tokens', 0):,.0f} tok in {row.get('sample_s', 0):.2f} s"
                 f" (+{row.get('sample_overlapped_s', 0):.2f} s overlapped) | train {row['train_s']:.2f} s"
                 f" | policy_v {row.get('policy_v', row.get('pool_version', '-'))} staleness {row.get('staleness', 0)}")
    if "p_mc_mean" in row:
        line += f" | p_mc {row['p_mc_mean']:.3f} [{row['p_mc_min']:.2f}, {row['p_mc_max']:.2f}]"
    if "reward_mean" in row:
        line += f" | reward {row['reward_mean']:.3f}"
    return line
