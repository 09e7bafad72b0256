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


def test_whole_proof_dcoa_and_grpo_on_cuda():
    token_logp = torch.log(torch.tensor([[0.5], [0.9], [0.4]], dtype=torch.float64)).cuda()
    mask = torch.ones(3, 1, device="cuda")
    _, weight = obj.whole_proof_dco_loss(token_logp, mask, torch.tensor([7, 3, 7], device="cuda"), budget=4)
    _, cpu_weight = obj.whole_proof_dco_loss(token_logp.cpu(), mask.cpu(), torch.tensor([7, 3, 7]), budget=4)
    torch.testing.assert_close(weight.cpu(), cpu_weight)
    _, w = obj.dcoa_loss(token_logp, mask, torch.tensor([0, 6, 64], device="cuda"), 64, budget=64)
    assert w.device.type == "cuda"
    adv = obj.group_advantages(torch.tensor([[1.0, 0.0]], device="cuda")).reshape(-1)
    loss = obj.dr_grpo_loss(token_logp[:2].float(), mask[:2], adv, group_size=2)
    assert loss.device.type == "cuda"
