"""The word-level tokenizer `passn bench sample --device cuda` gives its vLLM pool: a prompt of
words t{i} tokenizes to exactly the ids the other engines get, also after a save and a reload (as
the pool's engine loads it), and sampled ids decode."""

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from jobs.bench_sample import numbered_tokenizer
from passn.models import write_model_folder


def test_prompt_words_tokenize_to_their_ids_after_a_reload(tmp_path):
    tokenizer = numbered_tokenizer(32000)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2))
    write_model_folder(model, tokenizer, str(tmp_path / "m"))
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "m")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32000, (128,), generator=g).tolist() + [17, 1000, 29999, 3, 21, 2222]
    text = " ".join(f"t{i}" for i in ids)
    for tok in (tokenizer, reloaded):
        assert tok(text, add_special_tokens=True).input_ids == ids
        assert tok.decode([5, 17, 2], skip_special_tokens=True) == "t5 t17"
