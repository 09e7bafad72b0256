"""The cheap per-epoch signal: pass@k of the live weights on the held-out problems.

Direct answers: exact pass@k from the reference's own probability (MATH.md section 1). Chain of
thought: ``evaluation.samples_per_problem`` sampled completions per problem, verified, pass@k by
the unbiased estimator (the reference chain's exact coverage beside it), sampled by the
transformers engine on the live weights or (``evaluation.sampler: pool``) by the worker's
sampler pool given them in memory (``trainer.policy_pool``; on a GPU, CUDA vLLM). Each worker
evaluates its share of the problems; rank 0 writes ``eval/epoch_NNN.jsonl`` and
``eval/epoch_NNN.summary.json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import fsspec
from passn import evaluation, results
from passn.collective import Collective
from passn.config import RunConfig
from passn.data import Example
from passn.sampling import group_by_prompt


class EpochEvaluation:
    def __init__(self, cfg: RunConfig, run_dir: str, task, tokenizer, problems: Sequence, examples: Sequence[Example],
                 collective: Collective, policy=None, settle: Callable[[], None] | None = None) -> None:
        """``policy``: the worker's :class:`trainer.policy_pool.PolicyPool` to sample with (None:
        the live weights); ``settle``: called before the pool takes this step's weights (the
        online sampler's background draw joins first)."""
        self.cfg, self.run_dir, self.task, self.tokenizer = cfg, run_dir.rstrip("/"), task, tokenizer
        self.problems, self.examples, self.collective = problems, examples, collective
        self.sampled = cfg.task.variant != "direct"
        self.policy, self.settle = policy, settle

    def __call__(self, module, epoch: int, step: int) -> None:
        if not self.examples:
            return
        cfg, task, c = self.cfg, self.task, self.collective
        started = time.perf_counter()
        module.eval()
        shard = list(range(c.rank, len(self.examples), c.world))
        logp = evaluation.sequence_logprobs(module, [self.examples[i] for i in shard], self.tokenizer.pad_token_id)
        prompts = [task.prompt(self.problems[i]) for i in shard]
        max_new = max(len(e.input_ids) - e.completion_start for e in self.examples) + 1
        greedy = evaluation.greedy_answers(module, self.tokenizer, prompts, max_new)
        verdicts = task.check_many([self.problems[i] for i in shard], [g[0] for g in greedy])
        counts = [0] * len(shard)
        answers: list[tuple[list, list]] = [([], [])] * len(shard)  # the sampled answers and verdicts (the pool's)
        seed = cfg.sampling.seed + 1000 * epoch + c.rank
        if self.sampled and self.policy is not None:
            counts, answers = self._pool_samples([self.problems[i] for i in shard], prompts, step, seed)
        elif self.sampled:  # chain of thought: the reference's probability is not pass@k; sample and verify
            counts = evaluation.sampled_correct_counts(
                module, self.tokenizer, task, [self.problems[i] for i in shard], prompts,
                cfg.evaluation.samples_per_problem, cfg.sampling.temperature, cfg.sampling.max_new_tokens, seed=seed)
        samples = cfg.evaluation.samples_per_problem if self.sampled else 0
        rows = [results.problem_record(self.problems[i].uid, samples, n_correct, (g[0], g[1], v.correct), *sampled,
                                       reference_logp=float(lp))
                for i, lp, g, v, n_correct, sampled in zip(shard, logp, greedy, verdicts, counts, answers)]
        gathered = c.gather(rows)
        module.train()
        if c.rank == 0:
            self._write(sorted((r for part in gathered for r in part), key=lambda r: r["uid"]), epoch, step,
                        time.perf_counter() - started)

    def _pool_samples(self, problems: Sequence, prompts: Sequence[str], step: int,
                      seed: int) -> tuple[list[int], list[tuple[list, list]]]:
        """How many of ``evaluation.samples_per_problem`` completions of each prompt, sampled by the
        pool holding the weights of ``step``, the task's verifier accepts; and each problem's
        sampled answers with their verdicts."""
        cfg = self.cfg
        if self.settle is not None:
            self.settle()
        self.policy.ensure(step)
        completions = self.policy.generate(prompts, cfg.evaluation.samples_per_problem, cfg.sampling.temperature,
                                           cfg.sampling.max_new_tokens, seed,
                                           [f"held-out problem {p.uid}" for p in problems])
        counts, answers = [], []
        for problem, group in zip(problems, group_by_prompt(completions, len(prompts))):
            texts = [g.text for g in group]
            verdicts = [v.correct for v in self.task.check_many([problem] * len(texts), texts)]
            counts.append(sum(verdicts))
            answers.append(([self.task.extract(t) for t in texts], verdicts))
        return counts, answers

    def _write(self, per_problem: list[dict[str, Any]], epoch: int, step: int, seconds: float) -> None:
        cfg = self.cfg
        sampler = "transformers, the live weights"
        if self.sampled and self.policy is not None:
            sampler = f"{cfg.resources.sampler_backend} pool, the weights of step {step} pushed in memory"
        provenance = {"run": self.run_dir.rsplit("/", 1)[-1], "step": step, "epoch": epoch,
                      "objective": cfg.objective.kind, "budget": cfg.objective.budget, "seed": cfg.seed,
                      "sampler": sampler, "verifier": f"in process ({cfg.task.answer_check})"}
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
              f"| conf>0.9 {g['fraction_high_confidence']:.3f} (wrong {g['fraction_high_confidence_wrong']:.3f}) "
              f"| evaluated in {seconds:.1f} s", flush=True)
