"""Lazy (row-wise) Adam for value-memory tables, fused over the touched rows.

The "lazy" value-memory optimiser updates only the rows a step touched, and the
moments of untouched rows do not decay: torch.optim.SparseAdam's semantics, with its
formula (eps added to sqrt(v) before the bias correction). SparseAdam needs a sparse
COO gradient, which it coalesces and walks with sparse bookkeeping every step; on CPU
that cost more than the dense fused AdamW it was meant to beat. This optimiser reads
the fast path's persistent dense gradient buffer at the rows the table reports as
touched (ValueTable.touched_rows: the distinct rows in a buffer of fixed size, so that
no host sync is needed; its padding repeats a row, computed again from the same
values and written with the same result): one index_select of parameters,
gradients and moments, torch's fused Adam kernel on those rows (one pass), one
index_copy back: no sparse tensor, no coalescing. SparseAdam's formula is Adam's with
eps / sqrt(1 - beta2^t) in place of eps, so the fused kernel gets that eps.
Moments are fp32 whatever the table's dtype, and a bf16 table gets its update
computed in fp32 and rounded once (no fp32 master copy).
"""

import math

import torch

from move.training.table_adamw import Fp32StateOptimizer, counted_fp32_state, step_count_tensor


class RowAdam(Fp32StateOptimizer):
    """params: value-memory table weights; tables: {id(weight): its ValueTable}."""

    def __init__(self, params, tables: dict, lr: float, betas=(0.8, 0.95), eps: float = 1e-10):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))
        self.tables = tables
        self.step_tensors: dict[torch.Tensor, torch.Tensor] = {}  # see step_count_tensor

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = counted_fp32_state(self.state[p], p)  # as SparseAdam: every step with a gradient
                touched = self.tables[id(p)].touched_rows()
                if touched is None or touched.ids.numel() == 0:
                    continue
                # the padding of the RowSet repeats its first row: computed from the same values,
                # it writes the same result (no unique, no host sync)
                rows = touched.ids
                m, v, step = state["exp_avg"], state["exp_avg_sq"], state["step"]
                weights = p.index_select(0, rows).float()
                m_rows, v_rows = m.index_select(0, rows), v.index_select(0, rows)
                count = step_count_tensor(self.step_tensors, p, step)
                torch._fused_adam_(
                    [weights],
                    [p.grad.index_select(0, rows).float()],
                    [m_rows],
                    [v_rows],
                    [],
                    [count],
                    lr=group["lr"],
                    beta1=beta1,
                    beta2=beta2,
                    weight_decay=0.0,
                    eps=group["eps"] / math.sqrt(1 - beta2**step),
                    amsgrad=False,
                    maximize=False,
                )
                if self.tables[id(p)].shard is not None:
                    # a shard with fixed exchanges that no rank asked for this step holds only
                    # padding (RowSet.first all False): nothing of it was touched, so nothing moves
                    untouched = ~touched.first[0]
                    weights = torch.where(untouched, p.index_select(0, rows).float(), weights)
                    m_rows = torch.where(untouched, m.index_select(0, rows), m_rows)
                    v_rows = torch.where(untouched, v.index_select(0, rows), v_rows)
                m.index_copy_(0, rows, m_rows)
                v.index_copy_(0, rows, v_rows)
                p.index_copy_(0, rows, weights.to(p.dtype))
        return None
