"""The objectives on CUDA tensors give the CPU's numbers (bf16 logits are upcast before softmax)."""

import pytest
import torch

from passn import objectives as obj

pytestmark = pytest.mark.gpu


def test_dco_on_cuda_matches_cpu():
    torch.manual_seed(0)
    logits = torch.randn(8, 16, 128, dtype=torch.bfloat16)
    targets = torch.randint(0, 128, (8, 16))
    mask = torch.ones(8, 16)
    cpu_loss, cpu_weight = obj.dco_loss(obj.token_logprobs(logits, targets), mask, budget=64)
    gpu_loss, gpu_weight = obj.dco_loss(obj.token_logprobs(logits.cuda(), targets.cuda()), mask.cuda(), budget=64)
    torch.testing.assert_close(gpu_weight.cpu(), cpu_weight, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, rtol=1e-5, atol=1e-6)
