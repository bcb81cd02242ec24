"""`move report <results-dir>`: tables, statistics and plots of an experiment,
as markdown (report.md) and as one self-contained HTML page (report.html, the
images inlined).

Sections: the main table in the paper's shape (rows = model size, columns =
variants, mean ± std over seeds), paired differences to the standard model of
the same size with 95% confidence intervals, the ablations, measured cost,
validation curves with a band over seeds, the metric against value-memory
parameters and against training FLOPs (dense baselines included), and for
images a sample grid per variant."""

import base64
import html
import re
from pathlib import Path

from move.config import MEMORY_LABELS
from move.errors import UserError
from move.experiments.budgets import budget_sections
from move.experiments.runner import Experiment
from move.experiments.stats import paired_difference, summarize_values
from move.readers import read_json_object
from move.training.curves import plot_curve_bands, plot_knowledge, plot_scaling
from move.training.trainer import read_metrics

# metric key -> (label, lower is better)
MIXED_IN = {"mix_val_bpb": ("bits per byte on the mixed-in corpus (what continued training forgets)", True)}
TEXT_METRICS = {"val_bpb": ("validation bits per byte", True), **MIXED_IN}
IMAGE_METRICS = {
    "fid": ("FID", True),
    "class_accuracy": ("class accuracy", False),
    "val_nll_bits": ("validation NLL (bits per image token)", True),
}
KNOWLEDGE_METRICS = {
    "knowledge_bits": ("stored knowledge (bits, cross-entropy estimate)", False),
    "recall_accuracy": ("recall accuracy under the held-out phrasing", False),
    "val_bpb": ("validation bits per byte", True),
    **MIXED_IN,
}
DIGITS = {"knowledge_bits": 0, "fid": 2}  # decimals shown per metric (default 4)
ABLATIONS = [("move-nog0", "move", "MoVE without g0"), ("lave-full", "lave", "LaVE with full gates + g0")]


def variant_order(name: str) -> tuple:
    """standard, LaVE x1, x2, ..., MoVE x1, x2, ..., the ablations, then the other designs."""
    family, _, density = name.partition("_x")
    rank = {
        "standard": 0,
        "lave": 1,
        "move": 2,
        "move-nog0": 3,
        "lave-full": 4,
        "value_residual": 5,
        "bigram": 6,
        "pkm": 7,
    }.get(family, 8)
    return rank, int(density or 0)


def display(name: str) -> str:
    family, _, density = name.partition("_x")
    label = {**MEMORY_LABELS, "move-nog0": "MoVE no-g0", "lave-full": "LaVE full-gates"}.get(family, family)
    return f"{label} x{density}" if density else label


def collect(out: Path, experiment: Experiment) -> dict:
    """{(size, variant): {seed: record}} for every finished run."""
    results = {}
    for spec in experiment.runs():
        run_dir = out / "runs" / spec.key
        summary_path = run_dir / "summary.json"
        if not summary_path.exists():
            continue
        record = read_json_object(summary_path, "run summary")
        samples = run_dir / "sample_metrics.json"
        if samples.exists():
            record.update(read_json_object(samples, "sample metrics file"))
        record["curve"] = read_metrics(run_dir)
        record["run_dir"] = run_dir
        results.setdefault((spec.size, spec.name), {})[spec.seed] = record
    if not results:
        raise UserError(f"{out}: no finished runs yet")
    return results


def table(head: list[str], rows: list[list[str]]) -> dict:
    return {"head": head, "rows": rows}


def build_sections(out: Path, experiment: Experiment, results: dict) -> list:
    """The report as a list of ("h", text) / ("p", text) / ("table", table) / ("img", path)."""
    modality = next(iter(next(iter(results.values())).values()))["task"]["modality"]
    image = modality == "image"
    all_metrics = {"image": IMAGE_METRICS, "knowledge": KNOWLEDGE_METRICS}.get(modality, TEXT_METRICS)
    metrics = {k: v for k, v in all_metrics.items() if all(k in r for runs in results.values() for r in runs.values())}
    sizes = list(dict.fromkeys(size for size, _ in results))
    variants = sorted({name for _, name in results}, key=variant_order)
    any_run = next(iter(next(iter(results.values())).values()))
    n_runs = sum(len(v) for v in results.values())
    s = [
        ("h1", f"Experiment: {experiment.name}"),
        ("p", experiment.description),
        (
            "p",
            f"{n_runs} finished runs of {len(experiment.runs())}; seeds {experiment.seeds}; "
            + (
                f"every run sees the same batches in the same order (data seed {experiment.data_seed})"
                if experiment.data_seed >= 0
                else "each seed draws its own data order (data seed = the seed), the same for every variant"
            )
            + f" and {any_run['tokens_seen']:,} training tokens; "
            + (
                f"every run starts from {experiment.train['init_from']} (--init-from), its added memory at zero"
                if experiment.train.get("init_from")
                else "the seed sets the initialisation, and runs with one seed share their transformer weights "
                "at initialisation"
            )
            + f", so differences are paired by seed. Device: {any_run['device']}. "
            "Cells: mean ± standard deviation over seeds (n = seeds). Δ: mean paired difference to the standard "
            "model of the same size with its 95% t-interval; * marks intervals that exclude zero.",
        ),
    ]
    if image:
        s.append(
            (
                "p",
                f"FID from {any_run['fid_samples']} class-balanced samples (guidance {any_run['cfg_scale']}) "
                f"against as many test images: biased upwards at this sample count, comparable only within "
                f"this report. Class accuracy by the project's classifier (its test accuracy "
                f"{any_run['classifier_test_accuracy']:.4f}).",
            )
        )
    for key, (label, lower) in metrics.items():
        digits = DIGITS.get(key, 4)
        s.append(("h2", f"{label} ({'lower' if lower else 'higher'} is better)"))
        rows = []
        for size in sizes:
            row = [size]
            for v in variants:
                runs = results.get((size, v))
                row.append(
                    f"{summarize_values(r[key] for r in runs.values()).format(digits)} (n={len(runs)})" if runs else ""
                )
            rows.append(row)
        s.append(("table", table(["size"] + [display(v) for v in variants], rows)))
        diff_rows = []
        for size in sizes:
            base = results.get((size, "standard"))
            for v in variants:
                if v == "standard" or (size, v) not in results or not base:
                    continue
                d = paired_difference(
                    {k: r[key] for k, r in results[(size, v)].items()}, {k: r[key] for k, r in base.items()}
                )
                diff_rows.append([size, display(v), d.format(digits), str(d.n)])
        if diff_rows:
            s.append(("table", table(["size", "variant", "Δ vs standard [95% CI]", "pairs"], diff_rows)))
        ablation_rows = []
        for size in sizes:
            for v in variants:
                for ablated, full, label_ in ABLATIONS:
                    if v.startswith(ablated + "_x") and (size, v.replace(ablated, full, 1)) in results:
                        ref = v.replace(ablated, full, 1)
                        d = paired_difference(
                            {k: r[key] for k, r in results[(size, v)].items()},
                            {k: r[key] for k, r in results[(size, ref)].items()},
                        )
                        ablation_rows.append(
                            [size, f"{label_} ({display(v)} − {display(ref)})", d.format(digits), str(d.n)]
                        )
        if ablation_rows:
            s += [
                ("p", f"Ablations ({label}):"),
                ("table", table(["size", "ablation", "Δ [95% CI]", "pairs"], ablation_rows)),
            ]
        contrast_rows = []
        for a, b in experiment.contrast_cells():
            if a in results and b in results:
                d = paired_difference(
                    {k: r[key] for k, r in results[a].items()}, {k: r[key] for k, r in results[b].items()}
                )
                contrast_rows.append([f"{a[0]} {display(a[1])}", f"{b[0]} {display(b[1])}", d.format(digits), str(d.n)])
        if contrast_rows:
            s += [
                ("p", f"Contrasts ({label}), paired by seed:"),
                ("table", table(["a", "b", "a − b [95% CI]", "pairs"], contrast_rows)),
            ]
    if modality == "knowledge":
        s += knowledge_sections(out, results, sizes, variants)
    if experiment.decay_budgets:
        key, (label, _) = next(iter(metrics.items()))
        s += budget_sections(out, experiment, results, variants, display, key, label)
    s.append(("h2", "Cost (measured)"))
    cost_rows = []
    for (size, v), runs in sorted(results.items(), key=lambda kv: (sizes.index(kv[0][0]), variant_order(kv[0][1]))):
        r0 = next(iter(runs.values()))
        p = r0["accounting"]["params"]
        peaks = [r["peak_memory_mb"] for r in runs.values() if r["peak_memory_mb"] is not None]
        cost_rows.append(
            [
                size,
                display(v),
                f"{p['value_memory']:,}",
                f"{p['total']:,}",
                f"{r0['accounting']['training_flops_per_token']:,}",
                summarize_values(r["tok_per_s"] for r in runs.values()).format(0),
                summarize_values(r["train_time_s"] for r in runs.values()).format(0),
                summarize_values(peaks).format(0) if peaks else "n/a",
            ]
        )
    s.append(
        (
            "table",
            table(
                [
                    "size",
                    "variant",
                    "value-memory params",
                    "total params",
                    "train FLOPs/token",
                    "tok/s",
                    "train s",
                    "peak MB",
                ],
                cost_rows,
            ),
        )
    )
    s.append(("p", "Runs are timed one after another on the same machine; `move bench` measures cost side by side."))
    curve_key = "val_nll_bits" if image else "val_bpb"
    s.append(("h2", "Validation curves (mean, band = lowest to highest seed)"))
    for size in sizes:
        path = out / f"curves_{re.sub(r'[^A-Za-z0-9_-]', '_', size)}.png"
        plot_curve_bands(
            {display(v): [r["curve"] for r in results[(size, v)].values()] for v in variants if (size, v) in results},
            curve_key,
            path,
            title=size,
        )
        s.append(("img", path))
    s.append(("h2", "The memory axis and the compute axis"))
    for key, (label, _) in metrics.items():
        points = []
        for (size, v), runs in results.items():
            r0 = next(iter(runs.values()))
            summary = summarize_values(r[key] for r in runs.values())
            points.append(
                {
                    "label": f"{size} {display(v)}",
                    "family": v.partition("_x")[0],
                    "memory_params": r0["accounting"]["params"]["value_memory"],
                    "flops": r0["accounting"]["training_flops_per_token"],
                    "mean": summary.mean,
                    "std": summary.std,
                }
            )
        path = out / f"scaling_{key}.png"
        plot_scaling(points, label, path, title=label)
        s.append(("img", path))
    if image:
        s.append(("h2", "Samples (first seed; one row per class)"))
        for size in sizes:
            for v in variants:
                runs = results.get((size, v))
                if runs and (grid := runs[min(runs)]["run_dir"] / "samples.png").exists():
                    s += [("p", f"{size} {display(v)}"), ("img", grid)]
    return s


def knowledge_sections(out: Path, results: dict, sizes: list, variants: list) -> list:
    """Bits per parameter group, and stored bits against the number of people."""

    rows, lines = [], {}
    for (size, v), runs in sorted(results.items(), key=lambda kv: (sizes.index(kv[0][0]), variant_order(kv[0][1]))):
        r0 = next(iter(runs.values()))
        params = r0["accounting"]["params"]
        bits = summarize_values(r["knowledge_bits"] for r in runs.values())
        memory = params["value_memory"]
        rows.append(
            [
                size,
                display(v),
                bits.format(0),
                f"{params['total']:,}",
                f"{bits.mean / params['total']:.4f}",
                f"{memory:,}",
                f"{bits.mean / memory:.4f}" if memory else "n/a",
            ]
        )
        k = r0["task"]["knowledge"]
        lines.setdefault(
            f"{display(v)}{' (deeper)' if 'deeper' in size else ''}, names of {k['name_tokens']} token(s)", []
        ).append((k["individuals"], bits.mean, bits.std))
    path = out / "knowledge_bits_vs_people.png"
    plot_knowledge(lines, path)
    return [
        ("h2", "Stored knowledge per parameter"),
        (
            "table",
            table(
                [
                    "size",
                    "variant",
                    "stored bits",
                    "total params",
                    "bits / param",
                    "value-memory params",
                    "bits / value-memory param",
                ],
                rows,
            ),
        ),
        (
            "p",
            "Stored bits (cross-entropy estimate) against the number of people in the corpus, "
            "by variant and name length:",
        ),
        ("img", path),
    ]


def render_markdown(sections: list, out: Path) -> str:
    lines = []
    for kind, value in sections:
        if kind == "h1":
            lines += [f"# {value}", ""]
        elif kind == "h2":
            lines += [f"## {value}", ""]
        elif kind == "p":
            lines += [value, ""] if value else []
        elif kind == "table":
            lines += ["| " + " | ".join(value["head"]) + " |", "|" + "---|" * len(value["head"])]
            lines += ["| " + " | ".join(row) + " |" for row in value["rows"]] + [""]
        elif kind == "img":
            rel = Path(value).relative_to(out)
            lines += [f"![{rel.stem}]({rel.as_posix()})", ""]
    return "\n".join(lines)


def render_html(sections: list, title: str) -> str:
    body = []
    for kind, value in sections:
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{html.escape(value)}</{kind}>")
        elif kind == "p" and value:
            body.append(f"<p>{html.escape(value)}</p>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in value["head"])
            rows = "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in value["rows"]
            )
            body.append(f"<table><tr>{head}</tr>{rows}</table>")
        elif kind == "img":
            data = base64.b64encode(Path(value).read_bytes()).decode()
            body.append(f'<img alt="{html.escape(Path(value).stem)}" src="data:image/png;base64,{data}">')
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>"
    )


def load_results(out) -> tuple[Experiment, dict]:
    """An experiment's results directory -> (its experiment, collect()'s finished runs)."""
    out = Path(out)
    if not (out / "experiment.toml").is_file():
        raise UserError(f"{out}: not an experiment results directory (no experiment.toml)")
    experiment = Experiment.load(out / "experiment.toml")
    return experiment, collect(out, experiment)


def write_experiment_report(out) -> Path:
    out = Path(out)
    experiment, results = load_results(out)
    sections = build_sections(out, experiment, results)
    (out / "report.md").write_text(render_markdown(sections, out))
    (out / "report.html").write_text(render_html(sections, experiment.name))
    print(f"report: {out / 'report.md'} and {out / 'report.html'}")
    return out / "report.md"
