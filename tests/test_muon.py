"""Muon with a chosen Newton-Schulz dtype against torch.optim.Muon."""

import torch

from move.training.muon import Muon, newton_schulz


def run(optimizer_class, steps=4, **kwargs):
    g = torch.Generator().manual_seed(0)
    # three wide matrices of one shape (orthogonalised as one stack), two tall ones, one alone
    shapes = [(24, 40), (40, 24), (24, 40), (16, 16), (40, 24), (24, 40)]
    params = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in shapes]
    opt = optimizer_class(params, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.01, **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return params, opt


def test_bf16_newton_schulz_batched_by_shape_is_torch_muon_up_to_rounding():
    """torch's Muon orthogonalises one matrix at a time; ours stacks the matrices of a
    shape into batched matmuls. The kernels may round differently on another CPU or a
    GPU, so the bound is rounding: a few bf16 ulps of an update of size lr (~1e-4),
    far below what a wrong coefficient, transpose or step size moves (>= 1e-3)."""
    ours, ours_opt = run(Muon, ns_dtype=torch.bfloat16)
    theirs, theirs_opt = run(torch.optim.Muon)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
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


def test_a_stack_is_orthogonalised_as_each_matrix_alone():
    g = torch.Generator().manual_seed(2)
    for shape in ((5, 24, 40), (3, 40, 24)):
        stack = torch.randn(shape, generator=g)
        alone = torch.stack([newton_schulz(m, (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float32) for m in stack])
        torch.testing.assert_close(newton_schulz(stack, (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float32), alone)
