"""The one weighted CE the step trains gives the CPU's numbers on CUDA tensors, for each kind of
coefficient (bf16 logits are upcast before softmax)."""

import pytest
import torch

from passn import objectives as obj
from passn.batches import Fixed, OwnCoverage, weighted_loss

pytestmark = pytest.mark.gpu


def test_dco_on_cuda_matches_cpu():
    torch.manual_seed(0)
    logits = torch.randn(8, 16, 128, dtype=torch.bfloat16)
    targets = torch.randint(0, 128, (8, 16))
    mask = torch.ones(8, 16)
    cpu_loss, cpu_weight = weighted_loss(obj.token_logprobs(logits, targets), mask, OwnCoverage(64), 0, "sequence_sum")
    gpu_loss, gpu_weight = weighted_loss(obj.token_logprobs(logits.cuda(), targets.cuda()), mask.cuda(), OwnCoverage(64),
                                         0, "sequence_sum")
    torch.testing.assert_close(gpu_weight.cpu(), cpu_weight, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, rtol=1e-5, atol=1e-6)


def test_fixed_coefficients_dcoa_and_grpo_on_cuda():
    token_logp = torch.log(torch.tensor([[0.5], [0.9], [0.4]], dtype=torch.float64)).cuda()
    mask = torch.ones(3, 1, device="cuda")
    dcoa = obj.dcoa_weights(torch.tensor([0, 6, 64], device="cuda"), 64, budget=64)
    assert dcoa.device.type == "cuda"
    loss, c = weighted_loss(token_logp, mask, Fixed(tuple(dcoa.tolist())), 0, "sequence_sum")
    cpu_loss, _ = weighted_loss(token_logp.cpu(), mask.cpu(), Fixed(tuple(dcoa.tolist())), 0, "sequence_sum")
    assert loss.device.type == "cuda" and c.device.type == "cuda"
    torch.testing.assert_close(loss.cpu(), cpu_loss)
    adv = obj.group_advantages(torch.tensor([[1.0, 0.0]], device="cuda")).reshape(-1)
    loss, _ = weighted_loss(token_logp[:2].float(), mask[:2], Fixed(tuple(adv.tolist())), 0, "sequence_sum")
    assert loss.device.type == "cuda"
