"""Muon with a chosen Newton-Schulz dtype against torch.optim.Muon."""

import torch

from move.training.muon import Muon, newton_schulz


def run(optimizer_class, steps=4, **kwargs):
    g = torch.Generator().manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(24, 40, generator=g)),
        torch.nn.Parameter(torch.randn(40, 24, generator=g)),
    ]
    opt = optimizer_class(params, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.01, **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return params, opt


def test_bf16_newton_schulz_is_torch_muon_exactly():
    ours, ours_opt = run(Muon, ns_dtype=torch.bfloat16)
    theirs, theirs_opt = run(torch.optim.Muon)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    # the same state layout, so checkpoints load into either
    theirs_opt.load_state_dict(ours_opt.state_dict())


def test_fp32_newton_schulz_agrees_to_bf16_precision_and_orthogonalises():
    ours, _ = run(Muon, ns_dtype=torch.float32)
    theirs, _ = run(torch.optim.Muon)
    for a, b in zip(ours, theirs):
        assert not torch.equal(a, b)
        torch.testing.assert_close(a, b, rtol=0, atol=0.02)
    # the iteration maps a matrix to one whose singular values lie near 1 (0.5..1.5 by design)
    g = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    s = torch.linalg.svdvals(newton_schulz(g, (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float32))
    assert s.min() > 0.5 and s.max() < 1.5
