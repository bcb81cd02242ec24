"""`move designs-table`: MoVE against the other memory designs, one table from
four committed measurements.

- text: an experiment with every design at equal extra parameters (validation bpb,
  paired by seed with the standard run of the same size);
- time: the same standard model trained longer with decay budgets; a design whose
  training step costs r times standard's is compared with standard at 200 r steps
  (the text runs' length), read per seed by linear interpolation between the
  neighbouring budgets: the comparison at equal measured training time;
- knowledge: the knowledge-capacity probe (stored bits, one column per corpus);
- bench: `move bench --shape small` JSON, the step-time ratios (side by side in one
  process, the shape of the text runs).
"""

import numpy as np

from move.errors import UserError
from move.experiments.budgets import collect_budgets
from move.experiments.report import display, load_results, variant_order
from move.experiments.stats import paired_difference, summarize_values
from move.readers import read_json_object


def interpolate_budgets(budgets: dict[int, float], steps: float) -> float:
    """The value at `steps` from {budget: value}, linear between neighbouring budgets;
    outside the measured range it is refused, not extrapolated."""
    points = sorted(budgets)
    if not points[0] <= steps <= points[-1]:
        raise UserError(f"{steps:.0f} steps lies outside the measured budgets {points[0]}..{points[-1]}")
    return float(np.interp(steps, points, [budgets[p] for p in points]))


def standard_budgets(time_out, metric: str = "val_bpb") -> dict[int, dict[int, float]]:
    """{seed: {budget steps: the standard model's metric}} of the time experiment."""
    experiment, results = load_results(time_out)
    by_budget = collect_budgets(experiment, results)
    if len(by_budget) != 1:
        raise UserError(f"{time_out}: expected one (size, variant) of standard runs, found {len(by_budget)}")
    (budgets,) = by_budget.values()
    seeds = set.intersection(*(set(runs) for runs in budgets.values()))
    return {seed: {b: runs[seed][metric] for b, runs in budgets.items()} for seed in sorted(seeds)}


def knowledge_bits(knowledge_out) -> dict[str, dict[str, dict[int, float]]]:
    """{size (corpus): {variant: {seed: stored bits}}}."""
    _, results = load_results(knowledge_out)
    table = {}
    for (size, variant), runs in results.items():
        table.setdefault(size, {})[variant] = {seed: r["knowledge_bits"] for seed, r in runs.items()}
    return table


def designs_table(text_out, time_out, knowledge_out, bench_json, metric: str = "val_bpb") -> str:
    """The markdown comparison (see the module docstring)."""
    text_experiment, text = load_results(text_out)
    sizes = list(dict.fromkeys(size for size, _ in text))
    if len(sizes) != 1:
        raise UserError(f"{text_out}: expected one size, found {', '.join(sizes)}")
    size = sizes[0]
    variants = sorted((v for s, v in text if s == size), key=variant_order)
    if "standard" not in variants:
        raise UserError(f"{text_out}: no standard runs to compare with")
    bench = read_json_object(bench_json, "benchmark file")
    if len(bench) != 1:
        raise UserError(f"{bench_json}: expected one vocabulary (move bench --shape small)")
    (bench,) = bench.values()
    knowledge = knowledge_bits(knowledge_out)
    at_budgets = standard_budgets(time_out, metric)
    corpora = sorted(knowledge)
    steps = text_experiment.train_config.steps
    standard = {seed: r[metric] for seed, r in text[size, "standard"].items()}
    standard_record = next(iter(text[size, "standard"].values()))
    base_flops = standard_record["accounting"]["forward_flops_per_token"]["total"]
    base_params = standard_record["accounting"]["params"]["total"]

    head = [
        "method",
        "extra params",
        "forward FLOPs/token (x std)",
        "train step (x std, measured)",
        f"validation bpb ({steps} steps)",
        "Δ vs standard, equal params",
        "Δ vs standard, equal time",
    ]
    head += [f"stored bits, {corpus}" for corpus in corpora]
    rows = []
    for variant in variants:
        runs = text[size, variant]
        record = next(iter(runs.values()))
        values = {seed: r[metric] for seed, r in runs.items()}
        flops = record["accounting"]["forward_flops_per_token"]["total"]
        extra = record["accounting"]["params"]["total"] - base_params
        if variant not in bench:  # run names are bench configuration names ("bigram_x4")
            raise UserError(f"{bench_json}: no measurement of {variant}")
        ratio = bench[variant]["train_ratio"]
        if variant == "standard":
            equal_params = equal_time = "-"
        else:
            equal_params = paired_difference(values, standard).format()
            at_equal_time = {seed: interpolate_budgets(b, ratio * steps) for seed, b in at_budgets.items()}
            equal_time = paired_difference(values, at_equal_time).format()
        bits = []
        for corpus in corpora:
            seeds = knowledge[corpus].get(variant)
            bits.append(summarize_values(seeds.values()).format(0) if seeds else "not run")
        rows.append(
            [
                display(variant),
                f"{extra:+,}",
                f"{flops / base_flops:.3f}",
                f"{ratio:.3f}",
                summarize_values(values.values()).format(),
                equal_params,
                equal_time,
                *bits,
            ]
        )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
