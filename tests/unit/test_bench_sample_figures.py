"""The arithmetic `passn bench sample --device cuda` prints: the card's bound and where time goes."""

import pytest

from jobs.bench_sample import _print_time_split, decode_step_s, device_time, memory_bandwidth


def test_a_card_missing_from_the_table_gets_no_bound():
    assert memory_bandwidth("NVIDIA H200") == 4.8e12 and memory_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert memory_bandwidth("NVIDIA L4") is None  # no figure is claimed for a card not listed


def test_the_decode_step_is_the_time_after_the_one_token_prefill():
    assert decode_step_s({"seconds": 2.6, "prefill_s": 0.05}, 256) == pytest.approx(0.01)


def test_the_time_split_prints_each_engine_against_the_bound_or_without_one(capsys):
    row = {"seconds": 2.6, "prefill_s": 0.05, "tokens_per_s": 1000.0}
    r = {"max_new_tokens": 256, "prompts": 4, "samples_per_prompt": 25, "decode_tokens_per_s_bound": 20_000.0,
         "passn_transformers": row, "vllm_offline": row, "vllm_pool": row,
         "vllm_offline_variants": [{**row, "engine_args": {"enforce_eager": True}}]}
    _print_time_split(r)
    out = capsys.readouterr().out
    assert "5.0 ms a step at the card's bandwidth" in out  # 100 rows at 20k tokens/s
    assert out.count("decode 10.0 ms/step (2.0x the bound)") == 4 and "{'enforce_eager': True}" in out
    _print_time_split({**r, "decode_tokens_per_s_bound": None})
    assert "the bound" not in capsys.readouterr().out


def test_device_time_names_the_operators_that_took_the_time():
    import torch

    layer, x = torch.nn.Linear(128, 128), torch.randn(32, 128)
    d = device_time(lambda: [layer(x) for _ in range(20)], "cpu")
    assert d["wall_s"] > 0 and d["busy_s"] > 0 and d["busy_fraction"] == d["busy_s"] / d["wall_s"]
    assert any("addmm" in name or "linear" in name for name, _ in d["top"])
