"""The main job: train several value-memory variants on identical data and report.

Every run uses the same seed, so it sees the same batches in the same order and
starts from the same shared weights (each tensor is drawn from a generator keyed by
the seed and its name: GPT.init_weights). Complete
runs are skipped, interrupted ones resume from their newest checkpoint. The
report is a markdown table (validation bpb, parameters by group, FLOPs per token,
measured tokens/s and peak memory) plus the validation curves in one PNG.
"""

from dataclasses import dataclass
from pathlib import Path

from move.errors import ConfigError
from move.files import atomic_write_json
from move.image.evaluate import evaluate_generator
from move.image.prepare import load_prepared_images
from move.readers import read_json_object
from move.recipes import RunSpec, parse_variant, resolve_checkpoint, start_training
from move.training.checkpoint import load_model
from move.training.curves import plot_runs
from move.training.trainer import read_metrics


@dataclass
class ImageEvalSpec:
    """Sample-based metrics of an image run: FID and class accuracy."""

    classifier: str | None = None  # a run of `move image-classifier`
    fid_samples: int = 500
    cfg_scale: float = 1.5


def run_comparison(
    base: RunSpec, variants: list[str], out, force: bool = False, image_eval: ImageEvalSpec | None = None
) -> dict:
    """Train `base` once per variant ("move:4", ...) into out/<variant>, then report."""
    out = Path(out)
    parsed = [parse_variant(s) for s in variants]  # validate all before training any
    summaries = {}
    for name, fields in parsed:
        run_dir = out / name
        summary_path = run_dir / "summary.json"
        if summary_path.exists() and not force:
            print(f"{name}: complete, skipped ({summary_path})")
            summaries[name] = read_json_object(summary_path, "run summary")
            continue
        resume = (run_dir / "run.json").exists() and not force
        trainer = start_training(base.with_model(**fields), run_dir, resume=resume, force=force)
        summaries[name] = trainer.run()
        if "stopped_at" in summaries[name]:
            print(f"{name}: stopped early; rerun the same command to resume")
            return summaries
    for name, summary in summaries.items():
        if summary["task"]["modality"] == "image":
            summary.update(image_sample_metrics(out / name, base.data, image_eval or ImageEvalSpec(None), force))
    write_report(out, summaries)
    return summaries


def image_sample_metrics(run_dir: Path, data_dir, spec: ImageEvalSpec, force: bool = False) -> dict:
    """FID, class accuracy and a sample grid of a finished image run (cached in
    sample_metrics.json: a rerun with the same settings costs nothing)."""
    path = run_dir / "sample_metrics.json"
    settings = {"fid_samples": spec.fid_samples, "cfg_scale": spec.cfg_scale}
    if path.exists() and not force:
        cached = read_json_object(path, "sample metrics file")
        if all(cached.get(k) == v for k, v in settings.items()):
            return cached
    if not spec.classifier:
        raise ConfigError("image comparisons need --classifier (a run of `move image-classifier`)")
    model, _ = load_model(resolve_checkpoint(run_dir), "cpu")
    data = load_prepared_images(data_dir)
    print(f"{run_dir.name}: sampling {spec.fid_samples} images for FID and class accuracy")
    metrics = evaluate_generator(
        model,
        data,
        resolve_checkpoint(spec.classifier),
        spec.fid_samples,
        spec.cfg_scale,
        grid_path=run_dir / "samples.png",
    )
    atomic_write_json(path, metrics)
    return metrics


def format_image_table(summaries: dict[str, dict]) -> str:
    head = (
        "| run | val NLL bits/token | FID | class accuracy | value-memory params | total params "
        "| train FLOPs/token | tok/s | peak MB |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, s in summaries.items():
        p = s["accounting"]["params"]
        peak = "n/a" if s["peak_memory_mb"] is None else f"{s['peak_memory_mb']:.0f}"
        lines.append(
            f"| {name} | {s['val_nll_bits']:.4f} | {s['fid']:.2f} | {s['class_accuracy']:.3f} | {p['value_memory']:,} "
            f"| {p['total']:,} | {s['accounting']['training_flops_per_token']:,} | {s['tok_per_s']:.0f} | {peak} |"
        )
    return "\n".join(lines)


def format_table(summaries: dict[str, dict]) -> str:
    base = summaries.get("standard", {}).get("val_bpb")
    head = (
        "| run | val bpb | Δ vs standard | value-memory params | router params | total params "
        "| train FLOPs/token | tok/s | Δ tok/s | peak MB |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base_speed = summaries.get("standard", {}).get("tok_per_s")
    for name, s in summaries.items():
        p = s["accounting"]["params"]
        delta = f"{s['val_bpb'] - base:+.4f}" if base is not None else "n/a"
        speed = f"{s['tok_per_s'] / base_speed:.2f}x" if base_speed else "n/a"
        peak = "n/a" if s["peak_memory_mb"] is None else f"{s['peak_memory_mb']:.0f}"
        lines.append(
            f"| {name} | {s['val_bpb']:.4f} | {delta} | {p['value_memory']:,} | {p['routers']:,} | {p['total']:,} "
            f"| {s['accounting']['training_flops_per_token']:,} | {s['tok_per_s']:.0f} | {speed} | {peak} |"
        )
    return "\n".join(lines)


def write_report(out: Path, summaries: dict[str, dict]) -> None:
    any_summary = next(iter(summaries.values()))
    image = any_summary["task"]["modality"] == "image"
    metric, title = (
        ("val_nll_bits", "validation NLL (bits per image token)") if image else ("val_bpb", "validation bits per byte")
    )
    curves = {name: read_metrics(out / name) for name in summaries}
    plot_runs(curves, metric, out / f"{metric}.png", title=title)
    table = format_image_table(summaries) if image else format_table(summaries)
    lines = [
        "# Value-memory comparison",
        "",
        f"Identical data order and shared-weight initialisation for every run; {any_summary['steps']} steps, "
        f"{any_summary['tokens_seen']:,} training tokens each, device {any_summary['device']}.",
        "Tokens/s are measured in one process, one run after another, on the same machine; peak MB is the "
        "run's peak resident memory on CPU (allocator peak on CUDA). Speed ratios between separately timed runs "
        "are indicative only: `move bench` measures cost side by side.",
    ]
    if image:
        s = any_summary
        lines += [
            "",
            f"Images: {s['task']['dataset']}, {s['task']['codebook_size']} codes on a "
            f"{'x'.join(map(str, s['task']['grid']))} grid. FID from {s['fid_samples']} class-balanced samples "
            f"(guidance scale {s['cfg_scale']}) against the first "
            f"{s['fid_samples']} test images with the Inception-v3 FID network; FID at this sample count is biased "
            "upwards and only comparable between rows of this table. Class accuracy: the project's classifier on "
            f"the samples (its own test accuracy: {s['classifier_test_accuracy']:.4f}).",
        ]
    lines += ["", table, "", f"![{title}]({metric}.png)", ""]
    if image:
        lines += [f"### {name}\n\n![{name} samples]({name}/samples.png)\n" for name in summaries]
    (out / "report.md").write_text("\n".join(lines))
    print(table)
    print(f"report: {out / 'report.md'}")
