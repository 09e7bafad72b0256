"""The cheap per-epoch signal: pass@k of the live weights on the held-out problems.

Direct answers: exact pass@k from the reference's own probability (MATH.md section 1). Chain of
thought: ``evaluation.samples_per_problem`` sampled completions per problem, verified, pass@k by
the unbiased estimator (the reference chain's exact coverage beside it). Each worker evaluates its
share of the problems; rank 0 writes ``eval/epoch_NNN.jsonl`` and ``eval/epoch_NNN.summary.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import fsspec
from passn import evaluation, results
from passn.collective import Collective
from passn.config import RunConfig
from passn.data import Example


class EpochEvaluation:
    def __init__(self, cfg: RunConfig, run_dir: str, task, tokenizer, problems: Sequence, examples: Sequence[Example],
                 collective: Collective) -> None:
        self.cfg, self.run_dir, self.task, self.tokenizer = cfg, run_dir.rstrip("/"), task, tokenizer
        self.problems, self.examples, self.collective = problems, examples, collective
        self.sampled = cfg.task.variant != "direct"

    def __call__(self, module, epoch: int, step: int) -> None:
        if not self.examples:
            return
        cfg, task, c = self.cfg, self.task, self.collective
        module.eval()
        shard = list(range(c.rank, len(self.examples), c.world))
        logp = evaluation.sequence_logprobs(module, [self.examples[i] for i in shard], self.tokenizer.pad_token_id)
        prompts = [task.prompt(self.problems[i]) for i in shard]
        max_new = max(len(e.input_ids) - e.completion_start for e in self.examples) + 1
        greedy = evaluation.greedy_answers(module, self.tokenizer, prompts, max_new)
        verdicts = task.check_many([self.problems[i] for i in shard], [g[0] for g in greedy])
        counts = [0] * len(shard)
        if self.sampled:  # chain of thought: the reference's probability is not pass@k; sample and verify
            counts = evaluation.sampled_correct_counts(
                module, self.tokenizer, task, [self.problems[i] for i in shard], prompts,
                cfg.evaluation.samples_per_problem, cfg.sampling.temperature, cfg.sampling.max_new_tokens,
                seed=cfg.sampling.seed + 1000 * epoch + c.rank)
        samples = cfg.evaluation.samples_per_problem if self.sampled else 0
        rows = [results.problem_record(self.problems[i].uid, samples, n_correct, (g[0], g[1], v.correct),
                                       reference_logp=float(lp))
                for i, lp, g, v, n_correct in zip(shard, logp, greedy, verdicts, counts)]
        gathered = c.gather(rows)
        module.train()
        if c.rank == 0:
            self._write(sorted((r for part in gathered for r in part), key=lambda r: r["uid"]), epoch, step)

    def _write(self, per_problem: list[dict[str, Any]], epoch: int, step: int) -> None:
        cfg = self.cfg
        provenance = {"run": self.run_dir.rsplit("/", 1)[-1], "step": step, "epoch": epoch,
                      "objective": cfg.objective.kind, "budget": cfg.objective.budget, "seed": cfg.seed,
                      "sampler": "transformers, the live weights", "verifier": f"in process ({cfg.task.answer_check})"}
        report = results.summarise(per_problem, cfg.evaluation.k_grid, provenance, exact=not self.sampled)
        if self.sampled:  # the reference chain's exact coverage beside the sampled pass@k
            report["pass_at_k_reference"] = results.summarise(per_problem, cfg.evaluation.k_grid, provenance,
                                                              exact=True)["pass_at_k"]
        report.update(epoch=epoch, step=step)
        with fsspec.open(f"{self.run_dir}/eval/epoch_{epoch:03d}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in per_problem)
        with fsspec.open(f"{self.run_dir}/eval/epoch_{epoch:03d}.summary.json", "w") as f:
            json.dump(report, f, indent=1)
        passes = " ".join(f"pass@{k} {v:.3f}" for k, v in report["pass_at_k"].items())
        g = report["greedy"]
        print(f"epoch {epoch} | {passes} | greedy acc {g['accuracy']:.3f} conf {g['mean_confidence']:.3f} "
              f"| conf>0.9 {g['fraction_high_confidence']:.3f} (wrong {g['fraction_high_confidence_wrong']:.3f})",
              flush=True)
