"""Experiment runner, statistics and report (issue: experiments)."""

import json
import math
from pathlib import Path

import pytest
import torch

from move.errors import ConfigError
from move.experiments.report import write_experiment_report
from move.experiments.runner import Experiment, run_experiment
from move.experiments.stats import paired_difference, summarize_values
from move.training.checkpoint import load_state_dict
from move.training.trainer import checkpoint_dirs

T_975_DF2 = 4.302652729911275  # Student's t, 97.5% quantile, 2 degrees of freedom (tables)


def test_summary_statistics_by_hand():
    s = summarize_values([1.0, 2.0, 3.0])
    assert (s.mean, s.std, s.n) == (2.0, 1.0, 3)
    assert summarize_values([5.0]).std == 0.0


def test_paired_difference_interval_by_hand():
    d = paired_difference({0: 3.0, 1: 5.0, 2: 4.0, 7: 9.0}, {0: 1.0, 1: 2.0, 2: 3.0})  # seed 7 unpaired
    half = T_975_DF2 * 1.0 / math.sqrt(3)  # differences 2, 3, 1: mean 2, std 1
    assert d.n == 3 and d.mean == pytest.approx(2.0)
    assert (d.low, d.high) == (pytest.approx(2 - half), pytest.approx(2 + half))
    assert not d.significant
    tight = paired_difference({0: 1.0, 1: 1.1, 2: 0.9}, {0: 0.0, 1: 0.0, 2: 0.0})
    assert tight.significant and tight.low == pytest.approx(1 - T_975_DF2 * 0.1 / math.sqrt(3))


def write_experiment(tmp_path, data):
    path = tmp_path / "tiny.toml"
    path.write_text(f"""
name = "tiny-grid"
data = "{data}"
preset = "tiny"
seeds = [0, 1]
variants = ["standard", "move:1", "move-nog0:1"]
contrasts = [["tiny/move:1", "tiny-deeper/standard"]]
[train]
steps = 4
batch_size = 2
eval_every = 2
eval_tokens = 512
checkpoint_every = 2
keep_checkpoints = 3
[sizes.tiny]
[sizes.tiny-deeper]
n_layer = 3
variants = ["standard"]
""")
    return path


def test_grid_runs_skips_resumes_and_reports(tmp_path, prepared_dir, capsys):
    path = write_experiment(tmp_path, prepared_dir)
    out = tmp_path / "results"
    run_experiment(path, out)
    keys = ["tiny/standard", "tiny/move_x1", "tiny/move-nog0_x1", "tiny-deeper/standard"]
    for key in keys:
        for seed in (0, 1):
            assert (out / "runs" / key / f"seed{seed}" / "summary.json").exists()
    first = capsys.readouterr().out
    assert first.count("training") == 8

    run_experiment(path, out)  # everything is done: nothing retrains
    assert "training" not in capsys.readouterr().out

    # an interruption: one run lost its last checkpoint and its summary
    victim = out / "runs" / "tiny" / "move_x1" / "seed1"
    final_weights, _ = load_state_dict(checkpoint_dirs(victim)[-1])
    (victim / "summary.json").unlink()
    import shutil

    shutil.rmtree(checkpoint_dirs(victim)[-1])
    run_experiment(path, out)
    assert "tiny/move_x1/seed1: resuming" in capsys.readouterr().out
    resumed, _ = load_state_dict(checkpoint_dirs(victim)[-1])
    assert all(torch.equal(resumed[k], final_weights[k]) for k in final_weights)

    write_experiment_report(out)
    report = (out / "report.md").read_text()
    for name in (
        "| tiny |",
        "| tiny-deeper |",
        "MoVE x1",
        "MoVE no-g0 x1",
        "Δ vs standard [95% CI]",
        "MoVE without g0",
        "(n=2)",
    ):
        assert name in report, name
    # a contrast: the paired difference computed here from the runs' own summaries
    bpb = {
        key: [json.loads((out / "runs" / key / f"seed{s}" / "summary.json").read_text())["val_bpb"] for s in (0, 1)]
        for key in ("tiny/move_x1", "tiny-deeper/standard")
    }
    diff = sum(a - b for a, b in zip(bpb["tiny/move_x1"], bpb["tiny-deeper/standard"])) / 2
    assert "Contrasts (validation bits per byte), paired by seed:" in report
    assert f"| tiny MoVE x1 | tiny-deeper standard | {diff:+.4f} [" in report
    for png in ("curves_tiny.png", "curves_tiny-deeper.png", "scaling_val_bpb.png"):
        assert (out / png).stat().st_size > 1000
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "<table>" in page


def test_a_run_another_process_holds_is_passed_over_and_taken_up_when_it_is_free(
    tmp_path, prepared_dir, capsys, monkeypatch
):
    """Two `move experiment` processes share a grid: the one that finds a run's lock
    held trains the other runs first and comes back to it (here the holder lets go
    without finishing, as a killed process would, so this one trains it)."""
    from move.experiments import runner
    from move.files import DirectoryLock

    path = tmp_path / "pair.toml"
    path.write_text(f"""
name = "pair"
data = "{prepared_dir}"
preset = "tiny"
seeds = [0]
variants = ["standard", "move:1"]
[train]
steps = 2
batch_size = 2
eval_every = 2
eval_tokens = 256
checkpoint_every = 2
""")
    out = tmp_path / "results"
    held = out / "runs" / "base" / "standard" / "seed0"  # the grid's first run
    lock = DirectoryLock(held)  # what the other process's trainer holds while it trains
    waits = []

    def other_process_lets_go(seconds):
        waits.append(seconds)
        lock.release()

    monkeypatch.setattr(runner.time, "sleep", other_process_lets_go)
    run_experiment(path, out)
    log = capsys.readouterr().out
    assert waits == [runner.BUSY_POLL_SECONDS]
    assert "1 run(s) are being trained by another process" in log
    assert log.index("move_x1/seed0: training") < log.index("standard/seed0: training")
    assert all((out / "runs" / "base" / v / "seed0" / "summary.json").exists() for v in ("standard", "move_x1"))


def test_without_waiting_a_run_another_process_holds_is_left_to_it(tmp_path, prepared_dir, capsys, monkeypatch):
    """--no-wait: the other runs are trained, the held one is neither waited for nor
    touched, and the command returns (the holder finishes it and writes the full report)."""
    from move.experiments import runner
    from move.files import DirectoryLock

    path = write_experiment(tmp_path, prepared_dir)
    out = tmp_path / "results"
    held = out / "runs" / "tiny" / "standard" / "seed0"
    lock = DirectoryLock(held)
    monkeypatch.setattr(runner.time, "sleep", lambda seconds: pytest.fail("waited for the held run"))
    assert run_experiment(path, out, wait=False) == out
    assert "1 run(s) are being trained by another process; left to it" in capsys.readouterr().out
    trained = {p.parent.relative_to(out / "runs").as_posix() for p in out.glob("runs/*/*/*/summary.json")}
    assert "tiny/standard/seed0" not in trained and len(trained) == len(Experiment.load(path).runs()) - 1
    assert not (held / "checkpoints").exists()  # not touched
    lock.release()


def test_a_runs_sample_metrics_are_computed_by_one_process(tmp_path, monkeypatch):
    """An image run's FID sampling happens under the run's lock: while another process
    holds it, this one passes the run over (DirectoryBusy) instead of sampling it too."""
    from types import SimpleNamespace

    from move.errors import DirectoryBusy
    from move.experiments import runner
    from move.files import DirectoryLock

    run_dir = tmp_path / "runs" / "base" / "move_x1" / "seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text("{}")  # trained: only the sample metrics are left
    sampled = []
    monkeypatch.setattr(runner, "image_sample_metrics", lambda *args: sampled.append(args))
    experiment = SimpleNamespace(name="images", decay_budgets=[], image={"fid_samples": 8})
    spec = SimpleNamespace(key="base/move_x1/seed0", data="data/mnist")
    bar = SimpleNamespace(set_description=lambda text: None, write=lambda text: None)
    with DirectoryLock(run_dir), pytest.raises(DirectoryBusy):
        runner.run_grid_entry(experiment, spec, tmp_path, "1/1", False, bar)
    assert sampled == []
    assert runner.run_grid_entry(experiment, spec, tmp_path, "1/1", False, bar)
    assert len(sampled) == 1


def test_only_runs_the_named_cells_every_seed_and_refuses_an_unknown_one(tmp_path, prepared_dir, capsys):
    path = write_experiment(tmp_path, prepared_dir)
    out = tmp_path / "results"
    with pytest.raises(ConfigError, match="--only 'tiny/move:4' is not a size/variant cell"):
        run_experiment(path, out, only=("tiny/move:4",))
    run_experiment(path, out, only=("tiny/move:1", "tiny-deeper/standard"))
    trained = sorted(p.parent.relative_to(out / "runs").as_posix() for p in out.glob("runs/*/*/*/summary.json"))
    assert trained == [f"{k}/seed{s}" for k in ("tiny-deeper/standard", "tiny/move_x1") for s in (0, 1)]
    assert capsys.readouterr().out.count("training") == 4


def assert_refused(path, text: str, match: str) -> None:
    """Experiment file `path` holding `text` is refused with a ConfigError matching `match`."""
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        Experiment.load(path)


def test_experiment_files_are_validated(tmp_path, prepared_dir):
    path = write_experiment(tmp_path, prepared_dir)
    text = path.read_text()
    assert_refused(path, text.replace("[train]", "[train]\nstepz = 3"), "unknown key.*stepz")
    assert_refused(path, text.replace('"move:1"', '"moe:1"'), "unknown variant 'moe'")
    assert_refused(path, text.replace("seeds = [0, 1]", "seeds = []"), "seeds")


def test_sizes_and_variants_may_set_their_own_learning_rates_and_nothing_else(tmp_path, prepared_dir):
    path = write_experiment(tmp_path, prepared_dir)
    text = path.read_text().replace("[sizes.tiny-deeper]", "[sizes.tiny-deeper]\ntrain = {lr_value_memory = 0.05}")
    text += '\n[variant_train]\n"move:1" = {lr_embedding = 0.7}\n'
    path.write_text(text)
    experiment = Experiment.load(path)
    specs = {(r.size, r.variant, r.seed): experiment.run_spec(r).train for r in experiment.runs()}
    default = experiment.train_config
    assert specs["tiny", "standard", 1].optim == default.optim and specs["tiny", "standard", 1].seed == 1
    assert specs["tiny", "move:1", 0].optim.lr_embedding == 0.7
    assert specs["tiny", "move:1", 0].optim.lr_value_memory == default.optim.lr_value_memory
    deeper = specs["tiny-deeper", "standard", 0]
    assert deeper.optim.lr_value_memory == 0.05 and deeper.steps == default.steps and deeper.data_seed == 0
    assert_refused(path, text.replace("{lr_value_memory = 0.05}", "{steps = 9}"), "learning rates only")
    assert_refused(path, text.replace('"move:1" = {', '"move:4" = {'), "not a variant of the grid")


SHIPPED = sorted(p.stem for p in (Path(__file__).parent.parent / "experiments").glob("*.toml"))
FEWER_SEEDS = {  # what they are for instead of a ranking
    "designs-lr-sweep": 1,  # a rate sweep: calibration for designs-*, which use 3 seeds
    "knowledge-cpu": 2,  # the first probe runs, reported as 2-seed means
    "knowledge-paper-rate": 2,
}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_experiment_files_parse(name):
    experiment = Experiment.load(Path(__file__).parent.parent / "experiments" / f"{name}.toml")
    if name in FEWER_SEEDS:
        assert len(experiment.seeds) == FEWER_SEEDS[name]
    else:
        assert len(experiment.seeds) >= 3
    assert experiment.expected_minutes > 0 and experiment.runs()


def test_every_shipped_experiment_is_checked():
    assert len(SHIPPED) >= 25 and "news-cpu" in SHIPPED


def test_decay_budget_branch_equals_a_run_of_that_length_from_scratch(tmp_path, prepared_dir, capsys):
    """A warmup-stable-decay run branched in its stable phase and decayed to budget b
    is exactly the run that was planned for b steps from the start: same weights,
    same logged losses (the learning rate is constant until the branch point)."""

    def grid(steps, budgets):
        path = tmp_path / f"wsd{steps}.toml"
        path.write_text(f"""
name = "wsd"
data = "{prepared_dir}"
preset = "tiny"
seeds = [0]
variants = ["move:2"]
{"decay_budgets = " + str(budgets) if budgets else ""}
[train]
steps = {steps}
batch_size = 2
eval_every = 2
eval_tokens = 512
checkpoint_every = 4
warmdown_frac = 0.25
""")
        return path

    long_out, short_out = tmp_path / "long", tmp_path / "short"
    run_experiment(grid(12, [4, 8]), long_out)
    printed = capsys.readouterr()
    assert "decay to 4 steps from step 3" in printed.out
    # one progress bar over the grid: 12 steps, then 4 - 3 and 8 - 6 steps of decay
    assert "15/15" in printed.err and "16/15" not in printed.err
    run_experiment(grid(8, None), short_out)
    branch = long_out / "runs" / "base" / "move_x2" / "seed0" / "decay" / "steps_000008"
    scratch = short_out / "runs" / "base" / "move_x2" / "seed0"
    ours, _ = load_state_dict(checkpoint_dirs(branch)[-1])
    theirs, _ = load_state_dict(checkpoint_dirs(scratch)[-1])
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    from move.training.trainer import read_metrics

    assert [m["train_loss"] for m in read_metrics(branch)] == [m["train_loss"] for m in read_metrics(scratch)]
    assert [m["step"] for m in read_metrics(branch)] == [2, 4, 6, 8]  # the shared stable phase is carried over

    run_experiment(grid(12, [4, 8]), long_out)  # all done: nothing runs again
    printed = capsys.readouterr()
    assert "decay to" not in printed.out and "15/15" in printed.err
    report = write_experiment_report(long_out).read_text()
    assert "Budgets" in report


def test_decay_budgets_are_validated(tmp_path, prepared_dir):
    path = write_experiment(tmp_path, prepared_dir)
    text = path.read_text().replace('variants = ["standard"', 'decay_budgets = BUDGETS\nvariants = ["standard"', 1)
    for budgets, message in [("[2, 4]", "below steps"), ("[3, 2]", "increasing"), ("[1]", None)]:
        path.write_text(text.replace("BUDGETS", budgets))
        if message is None:
            assert Experiment.load(path).decay_budgets == [1]
        else:
            with pytest.raises(ConfigError, match=message):
                Experiment.load(path)


def test_a_comment_edit_keeps_finished_runs_and_a_grid_edit_is_refused(tmp_path, prepared_dir, capsys):
    path = write_experiment(tmp_path, prepared_dir)
    out = tmp_path / "results"
    run_experiment(path, out)
    capsys.readouterr()
    path.write_text(
        "# a comment\n" + path.read_text().replace('name = "tiny-grid"', 'name = "tiny-grid"\ndescription = "x"')
    )
    run_experiment(path, out)
    assert "training" not in capsys.readouterr().out  # nothing retrained
    path.write_text(path.read_text().replace("steps = 4", "steps = 5"))
    with pytest.raises(ConfigError, match="holds results of a different experiment"):
        run_experiment(path, out)


def test_setup_keeps_data_of_the_same_recipe_and_refuses_data_of_another(tmp_path, text_folder, capfd):
    """A [[setup]] step runs every time and its command decides: the same options keep the
    data untouched; data prepared with another vocabulary stops the experiment (it used
    to be skipped because its manifest existed, and the grid trained on the wrong data)."""
    import hashlib

    data = tmp_path / "data"
    prepare = [
        "prepare",
        "--corpus",
        "txt",
        "--path",
        str(text_folder),
        "--passage-tokens",
        "64",
        "--val-fraction",
        "0.25",
        "--out",
        str(data),
    ]

    def experiment(vocab):
        path = tmp_path / f"grid{vocab}.toml"
        path.write_text(
            f"""
name = "setup-check"
data = "{data}"
preset = "tiny"
seeds = [0]
variants = ["standard"]
[train]
steps = 2
batch_size = 2
eval_every = 2
eval_tokens = 256
[[setup]]
creates = "{data}/manifest.json"
command = {[*prepare, "--vocab-size", str(vocab)]!r}
""".replace("'", '"')
        )
        return path

    digest = lambda: hashlib.sha256(b"".join(p.read_bytes() for p in sorted(data.iterdir()))).hexdigest()
    run_experiment(experiment(400), tmp_path / "a")
    before = digest()
    run_experiment(experiment(400), tmp_path / "a")  # same recipe: kept as it is
    assert digest() == before
    with pytest.raises(ConfigError, match="setup step failed"):
        run_experiment(experiment(300), tmp_path / "b")
    assert "vocab_size: 400, not 300" in capfd.readouterr().err
    assert digest() == before and not (tmp_path / "b" / "runs").exists()


def test_every_variant_of_a_grid_gets_its_own_look_in_the_plots():
    """Nine variants, nine distinguishable lines: family = hue, density = shade and
    marker, ablation = dashes, and the same variant looks the same in every plot."""
    from move.training.curves import variant_style

    names = [
        "standard",
        "lave_x1",
        "lave_x2",
        "lave-full_x1",
        "move_x1",
        "move_x2",
        "move_x4",
        "move_x8",
        "move-nog0_x1",
        "small-deeper/standard",
    ]
    looks = [
        (
            tuple(variant_style(n)["color"])
            if not isinstance(variant_style(n)["color"], str)
            else variant_style(n)["color"],
            variant_style(n)["marker"],
            variant_style(n)["linestyle"],
        )
        for n in names
    ]
    assert len(set(looks)) == len(names)
    assert variant_style("move_x4 (n=3)") == variant_style("move_x4")
    darkness = [sum(variant_style(f"move_x{k}")["color"][:3]) for k in (1, 2, 4, 8)]
    assert darkness == sorted(darkness, reverse=True)  # more memory, darker


@pytest.mark.parametrize(
    "contrasts,message",
    [('[["tiny/move:8", "tiny/move:1"]]', "not a size/variant"), ('[["tiny/move:1"]]', "a pair of cells")],
)
def test_a_contrast_outside_the_grid_is_refused(tmp_path, prepared_dir, contrasts, message):
    path = write_experiment(tmp_path, prepared_dir)
    path.write_text(
        path.read_text().replace('contrasts = [["tiny/move:1", "tiny-deeper/standard"]]', f"contrasts = {contrasts}")
    )
    with pytest.raises(ConfigError, match=message):
        Experiment.load(path)
