"""Whole-proof DCO on the coq task: each step is weighed by F(N, product of its proof's step
probabilities), recomputed here from the same starting model for the first step's batch."""

import json
from pathlib import Path

import pytest
import torch

from jobs.train import run_training
from passn import objectives
from passn.config import load_config
from passn.data import CandidateStream, encode_examples
from passn.evaluation import sequence_logprobs
from passn.models import load_model
from passn.proof_steps import proof_step_task

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]

PROOFS = {  # theorem -> (state, tactic) steps
    "a.v:plus_0": [("n : nat\n|- n + 0 = n", "induction n."), ("|- 0 + 0 = 0", "reflexivity."),
                   ("n : nat\nIHn : n + 0 = n\n|- S n + 0 = S n", "simpl."), ("|- S (n + 0) = S n", "rewrite IHn.")],
    "a.v:t": [("|- True", "trivial.")],
    "b.v:and": [("A, B : Prop\n|- A -> B -> A /\\ B", "intros a b."), ("a : A\nb : B\n|- A /\\ B", "split.")],
    "b.v:or": [("A : Prop\n|- A -> A \\/ False", "intro a."), ("a : A\n|- A \\/ False", "left."), ("|- A", "exact a.")],
}


def test_whole_proof_weights_are_the_proofs_coverage_weights(tmp_path, golden):
    rows = [{"theorem": t, "file": t.split(":")[0], "step": i, "state": s, "tactic": tac}
            for t, steps in PROOFS.items() for i, (s, tac) in enumerate(steps)]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [f"task.train_path={tmp_path / 'train.jsonl'}", f"task.test_path={tmp_path / 'test.jsonl'}",
              "optim.sequences_per_step=4", "optim.micro_sequences_per_worker=2", "resources.num_workers=2",
              "model.tiny.max_position_embeddings=96", "evaluation.samples_per_problem=4", "evaluation.k_grid=[1,4]",
              "optim.warmup_steps=0"]
    # first CE until the step probabilities are far from 0, where F(N, p) ~ 1 would hide everything
    golden("ce_coq", run_training(load_config(str(ROOT / "configs" / "tiny-coq.yaml"),
                                              [*common, "objective.kind=ce", "optim.epochs=40", "evaluation.every_epochs=40"]),
                                  str(tmp_path / "ce")))
    (model_dir,) = sorted((tmp_path / "ce" / "checkpoints").iterdir())[-1:]
    cfg = load_config(str(ROOT / "configs" / "tiny-coq.yaml"), [
        *common, "model.tiny=null", f"model.path={model_dir / 'model'}", "objective.whole_proof=true",
        "objective.budget=4", "optim.epochs=1"])
    metrics = run_training(cfg, str(tmp_path / "run"))
    golden("whole_proof_dco", metrics, derived=True)  # from the ce_coq run's model
    assert [m["step"] for m in metrics] == [1, 2]  # 10 steps of 4 proofs, 4 a step

    # step 1 trains the stream's first 4 candidates, weighed with the initial model
    task = proof_step_task(cfg)
    model, tokenizer = load_model(cfg.model, cfg.seed)
    problems = task.problems("train")
    examples = encode_examples(tokenizer, task, problems, 96)
    with torch.no_grad():
        step_logp = sequence_logprobs(model.eval(), examples, tokenizer.pad_token_id)
    proof_logp = {t: sum(float(step_logp[i]) for i, p in enumerate(problems) if p.meta["theorem"] == t) for t in PROOFS}
    first = CandidateStream(len(examples), 1, cfg.seed).peek(4)
    weights = objectives.coverage_weight_from_logp(
        4, torch.tensor([proof_logp[problems[i].meta["theorem"]] for i in first], dtype=torch.float64))
    assert metrics[0]["weight_mean"] == pytest.approx(float(weights.mean()), rel=1e-5)
    assert metrics[0]["weight_min"] == pytest.approx(float(weights.min()), rel=1e-5)
    # F falls with p and a proof is less likely than any of its steps: its weight is at least each
    # step's own DCOstep weight, and here visibly different from it for some step
    step_weights = objectives.coverage_weight_from_logp(4, torch.tensor([float(step_logp[i]) for i in first]))
    assert bool((weights >= step_weights).all()) and float((weights / step_weights).max()) > 2, (weights, step_weights)
    # DCOstep from the same model and stream: each step weighed by its own F(N_eff, p)
    dco_step = run_training(cfg.model_copy(update={"objective": cfg.objective.model_copy(update={"whole_proof": False})}),
                            str(tmp_path / "dco_step"))
    golden("dco_step", dco_step, derived=True)
    assert dco_step[0]["weight_mean"] == pytest.approx(float(step_weights.mean()), rel=1e-5)
