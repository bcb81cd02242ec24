"""Report sections for experiments with `decay_budgets`: the final metric at every
training budget (each budget ends with its own full learning-rate decay), paired
differences per budget, and the value-memory diagnostics that explain them.

A run of T steps plus its branches gives, per seed, one final record for each budget
b in decay_budgets and for T itself; the records of one budget are paired by seed
like any other comparison (same initial shared weights, same batches)."""

import itertools
from pathlib import Path

from move.experiments.runner import Experiment, budget_dir
from move.experiments.stats import paired_difference, summarize_values
from move.readers import read_json_object
from move.training.curves import plot_budget_bands, plot_diagnostics
from move.training.trainer import read_metrics

# diagnostic key (averaged over layers where per layer) -> column label
DIAGNOSTICS = {
    "memory_share": "memory share ‖v'−v‖/‖v‖",
    "gate_spread_across_slots": "gate spread across slots",
    "g0_mean": "g0 mean",
    "slot_cosine": "slot-to-slot cosine",
    "rows_touched_frac": "rows touched / step",
    "row_norm_mean": "row norm",
}


def layer_mean(record: dict, key: str) -> float | None:
    """A diagnostic of an evaluation record: the model-wide value, or the mean over
    layers of a per-layer one (None when the variant has no such quantity)."""
    if f"vm/{key}" in record:
        return record[f"vm/{key}"]
    values = [v for k, v in record.items() if k.startswith("vm/layer") and k.endswith(f"/{key}")]
    return sum(values) / len(values) if values else None


def collect_budgets(experiment: Experiment, results: dict) -> dict:
    """{(size, variant): {budget_steps: {seed: summary}}} from finished runs and branches."""
    by_budget = {}
    for key, runs in results.items():
        budgets = by_budget.setdefault(key, {})
        for seed, record in runs.items():
            budgets.setdefault(record["steps"], {})[seed] = record
            for budget in experiment.decay_budgets:
                summary = budget_dir(record["run_dir"], budget) / "summary.json"
                if summary.exists():
                    branch = read_json_object(summary, "run summary")
                    branch["curve"] = read_metrics(summary.parent)
                    budgets.setdefault(budget, {})[seed] = branch
    return by_budget


def budget_sections(
    out: Path, experiment: Experiment, results: dict, variants: list, display, metric: str, label: str
) -> list:
    by_budget = collect_budgets(experiment, results)
    sizes = list(dict.fromkeys(size for size, _ in by_budget))
    s = [
        ("h2", f"Budgets: {label} at the end of each training budget"),
        (
            "p",
            "Each budget ends with its own linear decay over its last "
            f"{experiment.train_config.optim.warmdown_frac:.0%} of steps: the shorter budgets branch from the "
            "longest run's stable phase (same weights, optimiser state and data position at the branch point), "
            "which is exactly a run planned for that budget. Cells: mean ± std over seeds.",
        ),
    ]
    for size in sizes:
        budgets = sorted({b for v in variants for b in by_budget.get((size, v), {})})
        tokens = {
            b: next(
                r["tokens_seen"]
                for v in variants
                for b2, runs in by_budget.get((size, v), {}).items()
                if b2 == b
                for r in runs.values()
            )
            for b in budgets
        }
        head = ["variant"] + [f"{b} steps ({tokens[b] / 1e6:.2f}M tokens)" for b in budgets]
        rows = []
        for v in variants:
            cells = by_budget.get((size, v), {})
            rows.append(
                [display(v)]
                + [
                    summarize_values(r[metric] for r in cells[b].values()).format(4) if b in cells else ""
                    for b in budgets
                ]
            )
        s += [("p", f"{size}: {label}"), ("table", {"head": head, "rows": rows})]
        pairs = [(v, "standard") for v in variants if v != "standard"]
        pairs += [(later, earlier) for earlier, later in itertools.pairwise(variants)]
        diff_rows = []
        for a, b in dict.fromkeys(pairs):
            if (size, a) not in by_budget or (size, b) not in by_budget:
                continue
            row = [f"{display(a)} − {display(b)}"]
            for budget in budgets:
                runs_a, runs_b = by_budget[(size, a)].get(budget), by_budget[(size, b)].get(budget)
                row.append(
                    paired_difference(
                        {k: r[metric] for k, r in runs_a.items()}, {k: r[metric] for k, r in runs_b.items()}
                    ).format(4)
                    if runs_a and runs_b
                    else ""
                )
            diff_rows.append(row)
        s += [
            (
                "p",
                "Paired differences (negative: the first is better), 95% t-interval, * excludes zero; "
                "vs standard, then each variant against its neighbour in the table:",
            ),
            ("table", {"head": ["pair", *head[1:]], "rows": diff_rows}),
        ]
        path = out / f"budgets_{size}.png"
        plot_budget_bands(
            {
                display(v): {
                    b: [(r["tokens_seen"], r[metric]) for r in runs.values()]
                    for b, runs in by_budget[(size, v)].items()
                }
                for v in variants
                if (size, v) in by_budget
            },
            path,
            ylabel=label,
            title=size,
        )
        s.append(("img", path))
        s += diagnostics_sections(out, size, variants, by_budget, budgets, display)
    return s


def diagnostics_sections(out: Path, size: str, variants: list, by_budget: dict, budgets: list, display) -> list:
    """What value memory is doing at the end of the longest budget, and over training."""
    longest = budgets[-1]
    rows = []
    for v in variants:
        finals = by_budget.get((size, v), {}).get(longest)
        if not finals or v == "standard":
            continue
        row = [display(v)]
        for key in DIAGNOSTICS:
            values = [layer_mean(r, key) for r in finals.values()]
            row.append(summarize_values(values).format(3) if None not in values else "")
        rows.append(row)
    if not rows:
        return []
    s = [
        (
            "p",
            f"Value-memory diagnostics at {longest} steps, on the last training batch (mean ± std over seeds). "
            "Memory share: how far memory and g0 move the values, averaged over layers; gate spread: the standard "
            "deviation of the slot gates across the slots of one position and head (0 while slots are "
            "interchangeable); slot cosine: mean cosine between the slots of one touched row (0 for independent "
            "slots, 1 for slots that move as one).",
        ),
        ("table", {"head": ["variant", *list(DIAGNOSTICS.values())], "rows": rows}),
    ]
    curves = {
        display(v): [r["curve"] for r in by_budget[(size, v)][longest].values()]
        for v in variants
        if v != "standard" and longest in by_budget.get((size, v), {})
    }
    path = out / f"diagnostics_{size}.png"
    plot_diagnostics(
        curves,
        {k: DIAGNOSTICS[k] for k in ("memory_share", "slot_cosine", "gate_spread_across_slots")},
        layer_mean,
        path,
        title=size,
    )
    return [*s, ("img", path)]
