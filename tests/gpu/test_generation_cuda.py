"""passn.generation on CUDA: KV-cache sampling in bf16 carries the model's own log-probabilities."""

import pytest
import torch

from passn.config import TinyModelSpec
from passn.generation import sample_tokens
from passn.models import EOS_ID, PAD_ID, build_tiny_model

pytestmark = pytest.mark.gpu


def test_cuda_samples_match_teacher_forcing():
    model, _ = build_tiny_model(TinyModelSpec(), seed=0)
    model = model.cuda().eval()
    prompts = [[1, 14, 15, 16, 3], [1, 20, 3]]
    rows = sample_tokens(model, prompts, samples=16, temperature=1.0, max_new_tokens=12, seed=0, eos_ids={EOS_ID},
                         pad_id=PAD_ID)
    again = sample_tokens(model, prompts, samples=16, temperature=1.0, max_new_tokens=12, seed=0, eos_ids={EOS_ID},
                          pad_id=PAD_ID)
    assert rows == again
    for prompt, samples in zip(prompts, rows):
        for s in samples[:4]:
            ids = torch.tensor([prompt + list(s.token_ids)], device="cuda")
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            want = sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(s.token_ids))
            assert s.cumulative_logprob == pytest.approx(want, abs=1e-4)
