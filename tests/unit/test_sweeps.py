"""passn.sweeps and `passn frontier` on hand-made result files, against hand-computed answers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from passn import sweeps

ROOT = Path(__file__).parents[2]


def test_grid_expansion_and_names():
    grid = sweeps.parse_grid(["objective.kind=ce,dco", "objective.budget=4,16", "seed=0"])
    trials = sweeps.expand(grid)
    assert [sweeps.trial_name(t) for t in trials] == [
        "kind=ce_budget=4_seed=0", "kind=ce_budget=16_seed=0", "kind=dco_budget=4_seed=0", "kind=dco_budget=16_seed=0"]
    assert sweeps.trial_name({"a.seed": "1", "task.seed": "2"}) == "a.seed=1_task.seed=2"  # clashing short names
    for bad in (["objective.budget"], ["=1,2"], ["seed=1,,2"], ["seed=1,1"], ["seed=1", "seed=2"]):
        with pytest.raises(sweeps.SweepError):
            sweeps.parse_grid(bad)


# pass@k at the last epoch (epoch 2); epoch 1 rows must be ignored by the frontier
HAND = {
    "ce": {1: {1: .30, 16: .90, 256: .99}, 2: {1: .40, 16: .70, 256: .80}},
    "dco16": {1: {1: .05, 16: .50, 256: .90}, 2: {1: .20, 16: .85, 256: .93}},
    "dco256": {1: {1: .01, 16: .30, 256: .95}, 2: {1: .05, 16: .60, 256: .97}},
}
BUDGET = {"ce": 1, "dco16": 16, "dco256": 256}


def write_sweep(root: Path) -> None:
    root.mkdir(parents=True)
    trials = [{"name": t, "overrides": []} for t in HAND]
    (root / "sweep.json").write_text(json.dumps({"trials": trials}))
    for t, epochs in HAND.items():
        rows = [{"trial": t, "objective": "ce" if t == "ce" else "dco", "budget": BUDGET[t], "seed": 0, "epoch": e,
                 "k": k, "pass_at_k": v} for e, ks in epochs.items() for k, v in ks.items()]
        (root / "trials" / t).mkdir(parents=True)
        (root / "trials" / t / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_frontier_on_hand_made_results(tmp_path):
    write_sweep(tmp_path / "sweep")
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "frontier", str(tmp_path / "sweep"), "--out",
                          str(tmp_path / "report"), "--recommend", "200"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "report" / "frontier.json").read_text())
    # by hand, epoch 2: N=1 -> ce .40; N=16 -> dco16 .85; N=256 -> dco256 .97
    assert report["frontier"] == [
        {"N": 1, "pass_at_N": .40, "train_budget": 1, "objective": "ce", "trial": "ce"},
        {"N": 16, "pass_at_N": .85, "train_budget": 16, "objective": "dco", "trial": "dco16"},
        {"N": 256, "pass_at_N": .97, "train_budget": 256, "objective": "dco", "trial": "dco256"}]
    assert len(report["table"]) == 18
    assert "train with dco at N' = 256" in out.stdout  # 200 is nearest to 256 on a log scale
    assert (tmp_path / "report" / "frontier.png").stat().st_size > 0
    assert "| 16 | 0.850 | 16 | dco | dco16 |" in (tmp_path / "report" / "report.md").read_text()
    at_epoch_1 = sweeps.frontier(json.loads((tmp_path / "report" / "frontier.json").read_text())["table"], epoch=1)
    assert [(f["N"], f["trial"]) for f in at_epoch_1] == [(1, "ce"), (16, "ce"), (256, "ce")]


def test_epoch_summaries_are_read_in_epoch_order(tmp_path):
    (tmp_path / "eval").mkdir()
    for epoch in (10, 2, 1):  # written out of order; the zero-padded names sort by epoch
        (tmp_path / "eval" / f"epoch_{epoch:03d}.summary.json").write_text(json.dumps({"epoch": epoch}))
    (tmp_path / "eval" / "epoch_001.jsonl").write_text("{}\n")  # per-problem rows: not a summary
    assert sweeps.read_epoch_summaries(str(tmp_path) + "/") == [{"epoch": 1}, {"epoch": 2}, {"epoch": 10}]


def test_recommend_picks_the_nearest_budget_on_a_log_scale():
    front = [{"N": 1, "train_budget": 1}, {"N": 16, "train_budget": 16}, {"N": 256, "train_budget": 256}]
    assert [sweeps.recommend(front, n)["train_budget"] for n in (1, 3, 5, 16, 60, 70, 1000)] == \
        [1, 1, 16, 16, 16, 256, 256]


def test_a_sweep_over_objectives_gives_each_only_the_fields_it_reads(capsys):
    from jobs.sweep import plan

    spec = plan(str(ROOT / "configs" / "tiny.yaml"), ["objective.kind=ce,dco,dr_grpo", "objective.budget=1,4"],
                ["task.variant=cot", "objective.ce_warmup_steps=0"])
    trials = {t["name"]: t["overrides"] for t in spec["trials"]}
    assert list(trials) == ["kind=ce_budget=1", "kind=dco_budget=1", "kind=dco_budget=4", "kind=dr_grpo_budget=1"]
    assert "objective.ce_warmup_steps=0" in trials["kind=dr_grpo_budget=1"]
    assert "objective.ce_warmup_steps=0" not in trials["kind=ce_budget=1"]  # CE has no warm-up: left out
    assert "kind=ce_budget=4 trains the same configuration as kind=ce_budget=1" in capsys.readouterr().out
