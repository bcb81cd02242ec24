"""AdamW for value-memory tables stored in bfloat16, with fp32 optimiser state
(the "exact" mode; the lazy mode's RowAdam keeps fp32 moments itself).

torch's AdamW keeps its moments in the parameter's dtype, so a bf16 bank would get
bf16 moments. This optimiser keeps the moments in fp32, computes the update in fp32
and rounds only the result into the bf16 weights (no fp32 master copy: that is what
halves the bank's memory): AdamW over every row of the fast path's dense gradient.
Work is done in row chunks so no bank-sized fp32 temporary is ever allocated.
On fp32 tables it computes exactly what torch.optim.AdamW computes (tested), which
is the check that it is AdamW.
"""

import math

import torch

CHUNK_ROWS = 4096


def counted_fp32_state(state: dict, p: torch.Tensor) -> dict:
    """A table's Adam state with fp32 moments whatever the table's dtype (created at
    the first step), its step count advanced by one: the state both table optimisers
    (this one and RowAdam) keep."""
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
    state["step"] += 1
    return state


class TableAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float, betas=(0.8, 0.95), eps: float = 1e-10, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _update(self, p, rows: slice, grad, m, v, group, step) -> None:
        """Adam update of rows `rows` of p, m, v."""
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        g = grad.float()
        m_rows, v_rows = m[rows], v[rows]
        m_rows.lerp_(g, 1 - beta1)
        v_rows.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        weights = p[rows].float()
        if wd:
            weights.mul_(1 - lr * wd)
        denom = (v_rows.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
        weights.addcdiv_(m_rows, denom, value=-lr / (1 - beta1**step))
        m[rows], v[rows] = m_rows, v_rows
        p[rows] = weights.to(p.dtype)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = counted_fp32_state(self.state[p], p)
                m, v, step = state["exp_avg"], state["exp_avg_sq"], state["step"]
                for start in range(0, p.shape[0], CHUNK_ROWS):
                    chunk = slice(start, start + CHUNK_ROWS)
                    self._update(p, chunk, p.grad[chunk], m, v, group, step)
        return None
