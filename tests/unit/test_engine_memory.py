"""A vLLM engine's KV cache on a shared GPU, sized from what it needs and what its share leaves
(passn.sampling.engine_kv_cache_bytes)."""

import pytest
from transformers import LlamaConfig

from passn.sampling import GPU_ENGINE_MARGIN_BYTES, engine_kv_cache_bytes, kv_bytes_per_token

GiB = 1 << 30


def test_kv_bytes_per_token_counts_keys_and_values_of_the_kv_heads():
    config = LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
                         head_dim=128)
    assert kv_bytes_per_token(config, 2) == 2 * 16 * 4 * 128 * 2
    no_gqa = LlamaConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=8)  # head_dim from the width
    assert kv_bytes_per_token(no_gqa, 4) == 2 * 2 * 8 * 32 * 4


def test_the_cache_holds_the_whole_batch_within_the_share():
    per_token, length, seqs = 64 << 10, 96, 1024
    whole_batch = 2 * seqs * length * per_token  # 12 GiB
    # a large share: exactly what the batch needs, not the whole share
    assert engine_kv_cache_bytes(per_token, length, seqs, 56 * GiB, 2 * GiB) == whole_batch
    # a small share: what is left after the weights and the margin
    assert engine_kv_cache_bytes(per_token, length, seqs, 8 * GiB, 2 * GiB) == 6 * GiB - GPU_ENGINE_MARGIN_BYTES
    with pytest.raises(ValueError, match="sampler_gpu_fraction"):
        engine_kv_cache_bytes(per_token, length, seqs, 3 * GiB, 2 * GiB)
