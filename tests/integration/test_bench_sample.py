"""`passn bench sample` on CPU, shrunk: both engines in the pool, the reference loop, the roofline."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def test_bench_sample_cpu_runs_both_engines(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "jobs.cli", "bench", "sample", "--prompts", "3", "--samples", "2",
           "--max-new-tokens", "4", "--hidden", "64", "--layers", "1", "--repeats", "1", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["prompts"] == 3 and r["samples_per_prompt"] == 2 and r["dtype"] == "float32"
    for name in ("vllm", "transformers", "generate_per_prompt"):
        b = r[name]
        assert 0 < b["tokens"] <= 3 * 2 * 4, (name, b)  # each sample stops at 4 tokens or at <eos>
        assert b["tokens_per_s"] == b["tokens"] / b["seconds"]
    assert r["ratio_vllm_over_transformers"] == r["vllm"]["tokens_per_s"] / r["transformers"]["tokens_per_s"]
    assert r["vllm"]["model_flops"] == pytest.approx(2 * r["model_parameters"] * r["vllm"]["tokens_per_s"])
    assert 1e9 < r["core_matmul_peak_flops"] < 1e13  # one core's matmul rate, measured in the same run
    assert "vLLM pool / transformers engine" in done.stdout and "5x the transformers engine needs" in done.stdout
