"""The fast value-memory path keeps the model's maths: forward, gradients and
optimiser updates equal the reference (direct) implementation."""

import copy

import pytest
import torch
from test_model import SHAPES, VOCAB, make_config, randomized

from move.model.gpt import GPT
from move.training.optim import OptimConfig, build_optimizers, clip_grad_norm


def grads_after_backward(model, mode, idx, micro_batches=1):
    model.set_value_memory_grad_mode(mode)
    model.zero_grad()
    for i in range(micro_batches):
        x = idx[i::micro_batches]
        model(x, targets=torch.roll(x, -1, 1)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize(
    "variant,extra",
    [
        ("move", {}),
        ("move", {"move_gate_g0": False}),
        ("move", {"slot_gate_channels": 4, "layer_start_bias": 2.0, "memory_density": 2}),
        ("lave", {"memory_density": 2}),
        ("lave", {"lave_full_gates": True}),
        ("bigram", {}),
        ("pkm", {}),
    ],
)
def test_fast_path_matches_reference_forward_and_gradients(shape, variant, extra):
    if variant in ("bigram", "pkm") and shape == "mla":
        pytest.skip("the other memory designs run on MHA/GQA")
    model = randomized(GPT(make_config(shape, variant, n_layer=4, **extra)), std=0.1)
    idx = torch.randint(0, VOCAB, (4, 10))
    reference = grads_after_backward(model, "autograd", idx, micro_batches=2)
    fast = grads_after_backward(model, "dense", idx, micro_batches=2)
    for name in reference:
        torch.testing.assert_close(fast[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)
    model.set_value_memory_grad_mode("autograd")
    expected = model(idx)
    model.set_value_memory_grad_mode("dense")
    assert torch.equal(model(idx), expected)


def test_dense_mode_reuses_one_gradient_buffer_and_zeroes_only_touched_rows():
    model = randomized(GPT(make_config("mha", "move")))
    model.set_value_memory_grad_mode("dense")
    pointers = set()
    for _step in range(3):
        idx = torch.randint(0, VOCAB, (2, 6))
        model(idx, targets=idx).backward()
        grad = model.bank.weight.grad
        pointers.add(grad.data_ptr())
        touched = sorted(set(idx.flatten().tolist()))
        assert (grad.flatten(1).abs().sum(1) > 0).nonzero().flatten().tolist() == touched
        model.zero_grad()
        assert model.bank.weight.grad is not None and not model.bank.weight.grad.any()
        assert model.blocks[0].attn.c_q.weight.grad is None
    assert len(pointers) == 1  # no bank-sized allocation after the first step


def test_a_plain_zero_grad_from_outside_leaves_no_stale_rows():
    """transformers' Trainer and peft zero gradients with nn.Module.zero_grad, which
    drops the dense buffer: the next step's gradient is right and the table forgets
    the rows of the dropped buffer (else its list of touched rows grows every step)."""
    model = randomized(GPT(make_config("mha", "move")))
    model.set_value_memory_grad_mode("dense")
    for _step in range(3):
        idx = torch.randint(0, VOCAB, (2, 6))
        torch.nn.Module.zero_grad(model)
        model(idx, targets=idx).backward()
        fast = model.bank.weight.grad.clone()
        assert len(model.bank.touched) == 1
    model.set_value_memory_grad_mode("autograd")
    model(idx, targets=idx).backward()
    torch.testing.assert_close(fast, model.bank.weight.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer_mode", ["exact", "lazy"])
def test_optimizer_steps_match_reference_adamw(optimizer_mode):
    """Exact mode gives AdamW's update everywhere. Lazy mode equals AdamW on rows
    touched every step, and freezes a row once it is no longer touched (AdamW keeps
    moving it on its momentum)."""
    torch.manual_seed(0)
    base = randomized(GPT(make_config("mha", "move")), std=0.1)
    models = {"ref": copy.deepcopy(base), "fast": copy.deepcopy(base)}
    models["ref"].set_value_memory_grad_mode("autograd")
    models["fast"].set_value_memory_grad_mode("dense")
    # AdamW for the matrices too: Muon's orthogonalisation would amplify the
    # float-rounding differences of the two paths beyond a tight tolerance
    opts = {
        "ref": build_optimizers(models["ref"], OptimConfig(optimizer="adamw")),
        "fast": build_optimizers(models["fast"], OptimConfig(optimizer="adamw", value_memory_optimizer=optimizer_mode)),
    }
    batches = [torch.tensor([[1, 2, 3, 4], [5, 1, 2, 3]])] + [torch.tensor([[1, 2, 3, 4], [4, 3, 2, 1]])] * 2
    after_first = None
    for idx in batches:
        for name, model in models.items():
            model(idx, targets=idx.roll(-1, 1)).backward()
            clip_grad_norm(list(model.parameters()), 1.0)
            for opt in opts[name]:
                opt.step()
            model.zero_grad()
        if after_first is None:
            after_first = models["fast"].bank.weight[5].detach().clone()
    ref, fast = models["ref"].bank.weight, models["fast"].bank.weight
    always, never = torch.tensor([1, 2, 3, 4]), torch.tensor([0, 6])
    # lazy RowAdam (SparseAdam's formula) orders its float ops differently from AdamW; updates are O(lr) = 0.7,
    # so 1e-4 is rounding, while a semantic difference would show at O(0.1)
    torch.testing.assert_close(fast[always], ref[always], rtol=1e-4, atol=1e-4)
    assert torch.equal(fast[never], base.bank.weight[never]) and torch.equal(ref[never], base.bank.weight[never])
    if optimizer_mode == "exact":
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(fast[5], after_first)  # frozen once untouched
        assert not torch.allclose(ref[5], after_first)  # AdamW's momentum kept moving it


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])  # clipping active, and inactive
def test_clipping_over_touched_rows_equals_clipping_the_whole_buffer(max_norm):
    from move.training.optim import touched_rows

    model = randomized(GPT(make_config("mha", "move")))
    model.set_value_memory_grad_mode("dense")
    idx = torch.randint(0, VOCAB, (2, 6))
    model(idx, targets=idx).backward()
    rows = touched_rows(model)
    touched = rows[id(model.bank.weight)]  # distinct ids first, then padding repeating the first
    distinct = sorted(set(idx.flatten().tolist()))
    assert len(touched.ids) == min(idx.numel(), VOCAB) and touched.first.sum() == len(distinct)
    assert touched.ids.tolist() == distinct + [distinct[0]] * (len(touched.ids) - len(distinct))
    params = list(model.parameters())
    whole = [p.grad.clone() for p in params]
    norm_rows = clip_grad_norm(params, max_norm, rows)
    clipped_rows = [p.grad.clone() for p in params]
    for p, g in zip(params, whole):
        p.grad.copy_(g)
    norm_whole = clip_grad_norm(params, max_norm)
    assert torch.allclose(norm_rows, norm_whole, rtol=1e-6)
    for a, p in zip(clipped_rows, params):
        assert torch.allclose(a, p.grad, rtol=1e-6, atol=0)


def test_row_set_holds_the_distinct_rows_in_a_buffer_bounded_by_the_table():
    """RowSet: fixed size min(ids, rows) - no host sync to size it - distinct ids first."""
    from move.model.value_tables import RowSet

    ids = torch.tensor([[7, 3, 7], [3, 9, 7]])
    rows = RowSet.of(ids, num_rows=100)
    assert rows.ids.tolist() == [3, 7, 9, 3, 3, 3] and rows.first.tolist() == [True] * 3 + [False] * 3
    bounded = RowSet.of(torch.tensor([1, 0, 1, 2, 0, 2, 1, 2]), num_rows=3)  # more lookups than rows
    assert bounded.ids.tolist() == [0, 1, 2] and bounded.first.all()
    empty = RowSet.of(torch.zeros(0, dtype=torch.long), num_rows=5)
    assert empty.ids.numel() == 0


def test_row_set_and_row_sums_leave_out_the_absent_id():
    """An id equal to the row count stands for no row (the padding of a fixed-size
    exchange): it never counts as touched, and a set of nothing but padding points
    at a real row (zeroing or reading it is harmless) with no entry marked first."""
    from move.model.row_ids import sum_repeated_rows
    from move.model.value_tables import RowSet

    with_absent = RowSet.of(torch.tensor([9, 4, 10, 2, 10, 4]), num_rows=10)
    assert with_absent.ids.tolist() == [2, 4, 9, 2, 2, 2] and with_absent.first.tolist() == [True] * 3 + [False] * 3
    full = RowSet.of(torch.tensor([0, 1, 2, 3, 4, 4, 4]), num_rows=4)  # every row, then the absent one
    assert full.ids.tolist() == [0, 1, 2, 3] and full.first.all()
    nothing = RowSet.of(torch.tensor([5, 5, 5]), num_rows=5)
    assert nothing.ids.tolist() == [0, 0, 0] and not nothing.first.any()
    ids = torch.tensor([3, 7, 3, 12, 1, 7, 12, 3])  # 12: absent
    values = torch.arange(8.0)[:, None].expand(8, 2) * torch.tensor([1.0, -1.0])
    rows, sums = sum_repeated_rows(ids, values, absent=12)
    expected = {i: sum(values[k] for k in range(8) if ids[k] == i) for i in (1, 3, 7)}  # written out
    assert rows.tolist() == [1, 3, 7, 12, 12, 12, 12, 12]
    for slot, i in enumerate((1, 3, 7)):
        assert torch.equal(sums[slot], expected[i])
    assert not sums[4:].any()


def test_slot_dropout_drops_gates_the_same_way_on_both_paths_and_only_in_training():
    """With one random state the fast and the reference path drop the same gates and
    give the same gradients; in eval mode (or at p = 0) nothing is dropped; the mixed
    values are unbiased over the drops."""
    model = randomized(GPT(make_config("mha", "move", memory_density=4, slot_dropout=0.25)), std=0.1)
    plain = randomized(GPT(make_config("mha", "move", memory_density=4)), std=0.1)
    plain.load_state_dict(model.state_dict())
    idx = torch.randint(0, VOCAB, (4, 10))
    grads = {}
    for mode in ("autograd", "dense"):
        torch.manual_seed(3)
        grads[mode] = grads_after_backward(model, mode, idx)
    for name in grads["autograd"]:
        torch.testing.assert_close(grads["dense"][name], grads["autograd"][name], rtol=1e-5, atol=1e-6, msg=name)
    torch.manual_seed(3)
    plain_grads = grads_after_backward(plain, "dense", idx)
    assert any(not torch.allclose(plain_grads[n], grads["dense"][n]) for n in plain_grads)  # it does drop
    model.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(model(idx), plain(idx))
    attn = model.blocks[0].attn.value_memory
    v = torch.randn(2000, 1, attn.heads, 8)
    logits = torch.randn(2000, 1, attn.heads, attn.slots + 1)
    from move.model.value_memory import mix_memory
    from move.model.value_tables import Slots

    slots = Slots(torch.randn(2000, 1, attn.heads, attn.slots, 8))
    dropped = mix_memory(v, logits, slots, True, slot_dropout=0.25)
    full = mix_memory(v, logits, slots, True)
    assert not torch.allclose(dropped, full)
    assert (dropped - full).mean().abs() < 0.05 * full.abs().mean()  # unbiased
