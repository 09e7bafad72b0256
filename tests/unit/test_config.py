"""passn.config: YAML plus dotted overrides, strict validation, errors that name field and fix."""

import re
from pathlib import Path

import pytest

from passn.config import ConfigError, RunConfig, config_hash, load_config, load_config_text, parse_override

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_defaults_are_valid():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.model.tiny is not None and cfg.objective.kind == "ce"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    load_config(str(path))


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("objective:\n  kind: dco\n  budget: 16\noptim:\n  epochs: 2\n")
    cfg = load_config(str(path), ["objective.budget=64", "evaluation.k_grid=[1, 16]", "task.seed=3"])
    assert (cfg.objective.kind, cfg.objective.budget, cfg.optim.epochs) == ("dco", 64, 2)
    assert cfg.evaluation.k_grid == [1, 16] and cfg.task.seed == 3


def test_yaml_text_loads_as_its_file_does(tmp_path):
    text = "objective:\n  kind: dco\n  budget: 16\noptim:\n  epochs: 2\n"
    (tmp_path / "run.yaml").write_text(text)
    overrides = ["objective.budget=64", "task.seed=3"]
    assert load_config_text(text, overrides) == load_config(str(tmp_path / "run.yaml"), overrides)
    assert load_config_text("") == load_config()
    with pytest.raises(ConfigError) as err:
        load_config_text(text, ["objective.budgt=3"], source="configs/sweep-base.yaml")
    assert "invalid configuration (configs/sweep-base.yaml with overrides objective.budgt=3)" in str(err.value)
    with pytest.raises(ConfigError, match="^configs/sweep-base.yaml: not valid YAML"):
        load_config_text("objective: [1, 2\n", source="configs/sweep-base.yaml")
    with pytest.raises(ConfigError, match="^<text>: the top level must be a mapping"):
        load_config_text("- 1\n")


def test_override_values_are_yaml():
    assert parse_override("objective.budget=64") == ("objective.budget", 64)
    assert parse_override("optim.learning_rate=2e-5") == ("optim.learning_rate", 2e-5)
    assert parse_override("model.path=s3://bucket/llama") == ("model.path", "s3://bucket/llama")
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_override("objective.budget")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("objective.budgt=3", "objective.budgt: unknown field (value 3); did you mean 'objective.budget'?"),
        ("objective.refill_threshold=1.5", "objective.refill_threshold (1.5) must be in [0, 1)"),
        ("objective.kind=foo", "objective.kind = 'foo': Input should be 'ce', 'dco', 'dco_step', 'dcoa' or 'dr_grpo'"),
        ("optim.sequences_per_step=0", "optim.sequences_per_step = 0: Input should be greater than or equal to 1"),
        ("evaluation.k_grid=[1, 512]", "evaluation.k_grid has k = [512] above evaluation.samples_per_problem (256)"),
        ("objective.kind=dcoa", "set task.variant = 'cot'"),
        ("model.tiny.head_dim=16", "model.tiny.head_dim (16) must be one of [32, 64"),
        ("resources.num_workers=3", "optim.sequences_per_step (64) must be divisible by resources.num_workers (3)"),
    ],
)
def test_errors_name_the_field_the_value_and_the_fix(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert expected in str(err.value)
    assert override in str(err.value)  # the source of the bad value is named too


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(str(tmp_path / "absent.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("objective: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(str(listy))


def test_config_hash_is_stable_and_sensitive():
    a = config_hash(load_config(None, ["objective.kind=dco", "objective.budget=4"]))
    b = config_hash(load_config(None, {"objective.budget": 4, "objective.kind": "dco"}))
    c = config_hash(load_config(None, ["objective.kind=dco", "objective.budget=8"]))
    assert a == b != c


def test_operational_fields_do_not_block_a_resume_and_training_fields_do():
    from jobs.train import check_resumable
    from passn.config import training_fields, training_hash

    trained = load_config(None, ["objective.kind=dco", "objective.budget=4"])
    manifest = {"config_hash": config_hash(trained), "training_hash": training_hash(trained),
                "training_fields": training_fields(trained)}
    knobs = load_config(None, ["objective.kind=dco", "objective.budget=4", "storage.keep_checkpoints=9",
                               "resources.sampler_sync_timeout_s=30", "storage.checkpoint_every_steps=5",
                               "resources.sampler_sleep=false"])
    assert training_hash(knobs) == training_hash(trained) and config_hash(knobs) != config_hash(trained)
    check_resumable(manifest, knobs, "runs/x")  # no error
    with pytest.raises(ConfigError, match=r"objective.budget: 4 -> 64"):
        check_resumable(manifest, load_config(None, ["objective.kind=dco", "objective.budget=64"]), "runs/x")
    # what samples the evaluations decides nothing that is trained
    cot = ["objective.kind=ce", "task.variant=cot"]
    live = load_config(None, cot)
    assert training_hash(live) == training_hash(load_config(None, [*cot, "evaluation.sampler=pool"]))
    # a checkpoint from before training hashes: the whole configuration must match
    old = {"config_hash": config_hash(trained)}
    check_resumable(old, trained, "runs/x")
    with pytest.raises(ConfigError, match="configuration hash"):
        check_resumable(old, knobs, "runs/x")


@pytest.mark.parametrize(("field", "hint"), [("sampling.samples_per_prompt=8", "evaluation.samples_per_problem"),
                                             ("storage.run_dir=runs/x", "--run-dir"),
                                             ("storage.s3_endpoint_url=http://127.0.0.1:1", "AWS_ENDPOINT_URL")])
def test_removed_fields_say_what_replaces_them(field, hint):
    with pytest.raises(ConfigError, match="no longer a configuration field") as err:
        load_config(None, [field])
    assert hint in str(err.value)


@pytest.mark.parametrize(("sets", "expected"), [
    (["objective.budget=64"], "objective.budget does not apply to objective.kind = 'ce' (it applies to 'dco', "
                              "'dco_step', 'dcoa')"),
    (["objective.kind=dco", "objective.mc_samples=8"], "objective.mc_samples does not apply to objective.kind = 'dco'"),
    (["objective.kind=dco", "objective.whole_proof=true"], "objective.whole_proof does not apply"),
    (["objective.kind=dr_grpo", "objective.budget=4"], "objective.budget does not apply to objective.kind = 'dr_grpo'"),
    (["objective.kind=dco", "objective.group_size=4"], "objective.group_size does not apply"),
    (["objective.kind=ce", "objective.staleness=1"], "objective.staleness does not apply"),
])
def test_objective_fields_that_mean_nothing_for_the_kind_cannot_be_set(sets, expected):
    with pytest.raises(ConfigError, match="remove it") as err:
        load_config(None, sets)
    assert expected in str(err.value)


def test_objective_fields_apply_to_their_kinds_and_defaults_stay_harmless(tmp_path):
    from passn.config import to_yaml

    for kind, sets in [("dco", ["objective.budget=16", "objective.refill_threshold=0.1"]),
                       ("dcoa", ["task.variant=cot", "objective.mc_samples=8", "objective.staleness=1",
                                 "objective.budget=4"]),
                       ("dr_grpo", ["task.variant=cot", "objective.group_size=4", "objective.ce_warmup_steps=2"])]:
        cfg = load_config(None, [f"objective.kind={kind}", *sets])
        # a written config.yaml (every field, defaults included) loads again: what a resume reads
        path = tmp_path / f"{kind}.yaml"
        path.write_text(to_yaml(cfg))
        assert load_config(str(path), []) == cfg
    assert load_config(None, ["objective.kind=ce", "objective.budget=1"]).objective.budget == 1  # the default


def test_switching_the_kind_on_the_command_line_drops_the_files_fields_for_the_old_kind():
    cfg = load_config(str(Path(__file__).parents[2] / "configs" / "tiny-dcoa.yaml"), ["objective.kind=ce"])
    assert cfg.objective.kind == "ce" and cfg.objective.budget == 1 and cfg.objective.mc_samples == 64
    with pytest.raises(ConfigError, match="objective.budget does not apply"):  # set by the override itself: an error
        load_config(str(Path(__file__).parents[2] / "configs" / "tiny-dcoa.yaml"),
                    ["objective.kind=ce", "objective.budget=8"])


def test_a_key_named_twice_a_folder_and_a_non_utf8_file_are_named_errors(tmp_path):
    (tmp_path / "twice.yaml").write_text("objective:\n  kind: dco\n  budget: 4\n  budget: 8\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: not valid YAML: .*key 'budget' appears twice \(lines 3 and 4\)"):
        load_config(str(tmp_path / "twice.yaml"))
    (tmp_path / "sections.yaml").write_text("optim:\n  epochs: 2\noptim:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="key 'optim' appears twice"):
        load_config(str(tmp_path / "sections.yaml"))
    with pytest.raises(ConfigError, match="a folder, not a configuration file"):
        load_config(str(tmp_path))
    (tmp_path / "latin1.yaml").write_bytes("optim: {epochs: 2}  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text \(byte 25\)"):
        load_config(str(tmp_path / "latin1.yaml"))


def test_infinite_numbers_and_booleans_for_numbers_are_refused():
    for override, message in (("optim.learning_rate=.inf", "optim.learning_rate = inf: Input should be a finite"),
                              ("optim.learning_rate=nan", "Input should be a finite number"),
                              ("objective.budget=true", "budget = True: a boolean where a number is expected"),
                              ("optim.epochs=false", "epochs = False: a boolean")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, ["objective.kind=dco", override])
    assert load_config(None, ["objective.kind=dco", "objective.whole_proof=false"]).objective.whole_proof is False


def test_samplers_share_their_workers_gpu_and_the_worker_asks_ray_for_both_shares():
    online = ["objective.kind=dr_grpo", "resources.gpus_per_worker=0.5", "resources.sampler_gpu_fraction=0.2",
              "resources.sampler_actors=2"]
    cfg = load_config(None, online)
    assert cfg.samplers_share_worker_gpu() and cfg.gpus_per_training_worker() == pytest.approx(0.9)
    spread = load_config(None, [*online, "resources.sampler_gpu=ray"])  # Ray places the samplers' shares itself
    assert not spread.samplers_share_worker_gpu() and spread.gpus_per_training_worker() == 0.5
    assert load_config(None, ["objective.kind=dco", "resources.gpus_per_worker=1"]).gpus_per_training_worker() == 1
    with pytest.raises(ConfigError, match=r"exceeds one GPU.*resources.sampler_gpu = 'ray'"):
        load_config(None, [*online, "resources.sampler_gpu_fraction=0.3"])
    assert load_config(None, [*online, "resources.sampler_gpu_fraction=0.3", "resources.sampler_gpu=ray"])


def test_a_run_holds_its_workers_cpus_and_for_online_objectives_its_samplers_and_checkers():
    from jobs.train import cpus_per_run, local_cpus

    ce = load_config(None, ["objective.kind=ce", "resources.num_workers=2", "resources.cpus_per_worker=1.5"])
    assert cpus_per_run(ce) == 3.0
    grpo = load_config(None, ["objective.kind=dr_grpo", "resources.num_workers=2", "resources.sampler_actors=2",
                              "resources.sampler_cpus=0.5"])
    assert cpus_per_run(grpo) == 2 * 1 + 2 * 2 * 0.5  # a sweep runs as many such trials at a time as fit
    math = load_config(None, ["objective.kind=dr_grpo", "task.kind=math", "task.train_path=x.jsonl",
                              "task.test_path=y.jsonl"])
    assert cpus_per_run(math) == 1 + 0.5 + 0.25  # and the worker's answer checker
    assert local_cpus(math) >= 2


def test_a_ce_run_evaluated_by_a_pool_holds_the_pools_resources_and_direct_answers_refuse_it():
    from jobs.train import cpus_per_run

    cot = ["objective.kind=ce", "task.variant=cot", "resources.gpus_per_worker=0.15",
           "resources.sampler_gpu_fraction=0.15", "resources.sampler_cpus=1"]
    live = load_config(None, cot)
    assert not live.has_sampler_pool() and live.gpus_per_training_worker() == 0.15 and cpus_per_run(live) == 1
    pool = load_config(None, [*cot, "evaluation.sampler=pool"])
    assert pool.evaluates_with_pool() and pool.samplers_share_worker_gpu()
    assert pool.gpus_per_training_worker() == pytest.approx(0.3) and cpus_per_run(pool) == 2  # no answer checker
    with pytest.raises(ConfigError, match="direct answers are evaluated exactly"):
        load_config(None, ["objective.kind=ce", "task.variant=direct", "evaluation.sampler=pool"])
    with pytest.raises(ConfigError, match="resources.sampler_actors must be >= 1"):
        load_config(None, [*cot, "evaluation.sampler=pool", "resources.sampler_actors=0"])
