"""A sweep's relative paths name files where it was planned, not in Ray Tune's trial directories."""

from pathlib import Path

import pytest

from jobs.sweep import plan, run_sweep, trial_config
from passn import sweeps

CONFIG = str(Path(__file__).parents[2] / "configs" / "smollm2-cot.yaml")  # data paths relative: data/arith/


def test_relative_data_paths_are_pinned_to_where_the_sweep_is_planned(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = plan(CONFIG, ["objective.kind=ce,dcoa"], ["task.test_path=held/out.jsonl"])
    for trial in spec["trials"]:
        cfg = trial_config(spec, trial)
        assert cfg.task.train_path == str(tmp_path / "data" / "arith" / "train.jsonl")
        assert cfg.task.test_path == str(tmp_path / "held" / "out.jsonl")
        assert cfg.model.path == "pretrained:smollm2-135m-instruct"  # a name, not a path: unchanged
    # absolute paths and URLs stay as given
    spec = plan(CONFIG, ["objective.kind=ce"], ["task.train_path=s3://bucket/train.jsonl",
                                                 f"task.test_path={tmp_path}/t.jsonl"])
    cfg = trial_config(spec, spec["trials"][0])
    assert (cfg.task.train_path, cfg.task.test_path) == ("s3://bucket/train.jsonl", f"{tmp_path}/t.jsonl")


def test_missing_data_fails_the_sweep_before_any_trial_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data/arith/*.jsonl do not exist here
    spec = plan(CONFIG, ["objective.kind=ce"], [])
    with pytest.raises(sweeps.SweepError, match=r"task.train_path: .*data/arith/train.jsonl: no such file"):
        run_sweep(spec, str(tmp_path / "sweep"))
