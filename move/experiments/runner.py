"""Declarative experiments: one TOML file, a grid of runs, resumable.

    name = "shakespeare-cpu"
    description = "..."
    expected_minutes = 30          # on 2 CPU cores (stated, checked by nobody but you)
    data = "data/shakespeare"      # prepared text or image tokens
    preset = "small"
    seeds = [0, 1, 2]              # initialisation seeds: runs with one seed are paired
    data_seed = 0                  # one data order for every run of the grid
    variants = ["standard", "lave:1", "move:1", "move:4", "move-nog0:1"]

    [train]                        # flags of `move train` (underscores), the same for every run
    steps = 300
    batch_size = 16

    [sizes.small]                  # rows of the main table; keys override the preset
                                   # (and `data = ...` gives a size its own data;
                                   # `train = {lr_value_memory = 0.05}` its own learning
                                   # rates: a sweep is a size per rate)
    [sizes.small-deeper]           # a compute-matched dense baseline: more layers,
    n_layer = 6                    # standard only
    variants = ["standard"]

    [variant_train]                # optional: a variant's own learning rates (each method
    "bigram:1" = {lr_value_memory = 0.8}   # at the rate its sweep found best)

    [image]                        # image experiments: sample-based metrics per run
    classifier = "runs/image_main/classifier"
    fid_samples = 200
    cfg_scale = 1.5

    decay_budgets = [250, 500]     # optional: shorter budgets (steps) branched from each run
                                   # (warmup-stable-decay: the run's checkpoint at step
                                   # b - round(warmdown_frac * b), still in the stable phase,
                                   # decays for the rest of b steps); one run gives a curve
                                   # of final losses over budgets for little extra compute

    [[setup]]                      # `move` commands that create what the grid needs (each
    creates = "data/shakespeare/manifest.json"   # keeps its output when made with the same
                                                 # options, refuses other data; checked after)
    command = ["prepare", "--corpus", "shakespeare", "--out", "data/shakespeare"]

The grid is sizes x variants x seeds, run seed-major (every variant of seed 0
first), so an interrupted experiment already has complete pairs. Every run sees
the same batches in the same order (data_seed) and the same number of tokens;
finished runs are skipped, interrupted ones resume from their checkpoint.
Several processes may work on one grid at once (`move experiment FILE` started
twice, each with OMP_NUM_THREADS=1 on a 2-core machine): a run another process is
training (its directory lock is held) is passed over and looked at again later, so
each process trains different runs and returns once the whole grid is finished.
Results: <out>/runs/<size>/<variant>/seed<k>/ (run.json, metrics.jsonl,
summary.json, checkpoints), budget branches in <run>/decay/steps_<b>/, then
`move report <out>`.
"""

import dataclasses
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from move.config import ModelConfig
from move.errors import ConfigError, DirectoryBusy
from move.experiments.compare import ImageEvalSpec, image_sample_metrics
from move.files import DirectoryLock
from move.readers import read_toml
from move.recipes import RunSpec, parse_variant, start_training
from move.training.optim import decay_start
from move.training.trainer import TrainConfig, checkpoint_dirs

TOP_LEVEL = {
    "name",
    "description",
    "expected_minutes",
    "data",
    "preset",
    "seeds",
    "data_seed",
    "variants",
    "train",
    "sizes",
    "image",
    "setup",
    "decay_budgets",
    "variant_train",
    "contrasts",
}
IMAGE_KEYS = {"classifier", "fid_samples", "cfg_scale"}
TRAIN_KEYS = (TrainConfig.flat_keys() - {"seed", "data_seed"}) | {"label_dropout"}  # the grid sets the seeds
MODEL_KEYS = set(ModelConfig.__dataclass_fields__) - {"value_memory", "memory_density"}
# what a size or a variant may set for itself: learning rates only, so every run of a
# grid keeps the same steps, batches and schedule (and stays paired)
RATE_KEYS = {k for k in TRAIN_KEYS if k.startswith("lr_")}


@dataclass
class GridRun:
    """One cell of the grid: a size, a variant and a seed."""

    size: str
    variant: str  # e.g. "move:4"
    name: str  # e.g. "move_x4"
    seed: int
    fields: dict  # model-config overrides (size + variant)
    data: str  # prepared data (a size may bring its own: e.g. knowledge corpora of several sizes)
    rates: dict = field(default_factory=dict)  # learning rates of this size or variant (over [train])

    @property
    def key(self) -> str:
        return f"{self.size}/{self.name}/seed{self.seed}"


def budget_dir(run_dir: Path, budget: int) -> Path:
    """Where the branch of a run that decays to `budget` steps lives."""
    return Path(run_dir) / "decay" / f"steps_{budget:06d}"


@dataclass
class Experiment:
    name: str
    data: str
    preset: str
    seeds: list[int]
    variants: list[str]
    sizes: dict[str, dict]
    train: dict = field(default_factory=dict)
    data_seed: int = 0
    description: str = ""
    expected_minutes: float = 0
    image: dict = field(default_factory=dict)
    setup: list[dict] = field(default_factory=list)
    decay_budgets: list[int] = field(default_factory=list)
    variant_train: dict[str, dict] = field(default_factory=dict)
    # paired differences the report shows besides "vs standard": [a, b] cells as
    # "size/variant" (e.g. ["query-first/move:4", "query-first/move:1"])
    contrasts: list[list[str]] = field(default_factory=list)

    def branch_step(self, budget: int) -> int:
        """The step of the full run from which the branch for `budget` decays."""
        return decay_start(budget, self.train_config.optim)

    @classmethod
    def load(cls, path) -> "Experiment":
        path = Path(path)
        return cls.from_dict(read_toml(path, "experiment file"), str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "experiment") -> "Experiment":
        def refuse_unknown(keys, allowed, where):
            unknown = sorted(set(keys) - set(allowed))
            if unknown:
                raise ConfigError(f"{source}: unknown key(s) in {where}: {', '.join(unknown)}")

        refuse_unknown(raw, TOP_LEVEL, "the top level")
        for key in ("name", "data", "seeds", "variants"):
            if key not in raw:
                raise ConfigError(f"{source}: missing {key!r}")
        if (
            not raw["seeds"]
            or not all(isinstance(s, int) for s in raw["seeds"])
            or len(set(raw["seeds"])) != len(raw["seeds"])
        ):
            raise ConfigError(f"{source}: seeds must be a non-empty list of distinct integers")
        refuse_unknown(raw.get("train", {}), TRAIN_KEYS, "[train]")
        refuse_unknown(raw.get("image", {}), IMAGE_KEYS, "[image]")
        sizes = raw.get("sizes") or {"base": {}}
        for size, overrides in sizes.items():
            refuse_unknown(overrides, MODEL_KEYS | {"variants", "data", "train"}, f"[sizes.{size}]")
            refuse_unknown(overrides.get("train", {}), RATE_KEYS, f"[sizes.{size}.train] (learning rates only)")
        for variant, rates in raw.get("variant_train", {}).items():
            if variant not in raw["variants"] and not any(variant in s.get("variants", []) for s in sizes.values()):
                raise ConfigError(f"{source}: [variant_train] names {variant!r}, which is not a variant of the grid")
            refuse_unknown(rates, RATE_KEYS, f"[variant_train] {variant!r} (learning rates only)")
        for step in raw.get("setup", []):
            refuse_unknown(step, {"creates", "command"}, "[[setup]]")
            if not isinstance(step.get("command"), list) or "creates" not in step:
                raise ConfigError(f"{source}: each [[setup]] needs `command` (a list) and `creates`")
        experiment = cls(
            name=raw["name"],
            data=raw["data"],
            preset=raw.get("preset", "small"),
            seeds=raw["seeds"],
            variants=raw["variants"],
            sizes=sizes,
            train=raw.get("train", {}),
            data_seed=raw.get("data_seed", 0),
            description=raw.get("description", ""),
            expected_minutes=raw.get("expected_minutes", 0),
            image=raw.get("image", {}),
            setup=raw.get("setup", []),
            decay_budgets=raw.get("decay_budgets", []),
            variant_train=raw.get("variant_train", {}),
            contrasts=raw.get("contrasts", []),
        )
        experiment.runs()  # validates every variant name
        experiment.contrast_cells(source)
        experiment.check_budgets(source)
        return experiment

    def contrast_cells(self, source: str = "experiment") -> list[tuple[tuple[str, str], tuple[str, str]]]:
        """The contrasts as ((size, variant name), (size, variant name)) cells of the grid."""
        cells = {(r.size, r.variant): (r.size, r.name) for r in self.runs()}
        pairs = []
        for contrast in self.contrasts:
            if not (isinstance(contrast, list) and len(contrast) == 2 and all(isinstance(c, str) for c in contrast)):
                raise ConfigError(f'{source}: each contrast is a pair of cells, e.g. ["big/move:4", "big/move:1"]')
            found = [cells.get(tuple(c.split("/", 1))) for c in contrast]
            if None in found:
                missing = contrast[found.index(None)]
                raise ConfigError(f"{source}: contrast cell {missing!r} is not a size/variant of the grid")
            pairs.append((found[0], found[1]))
        return pairs

    def check_budgets(self, source: str) -> None:
        budgets = self.decay_budgets
        if not budgets:
            return
        if not all(isinstance(b, int) for b in budgets) or sorted(set(budgets)) != budgets:
            raise ConfigError(f"{source}: decay_budgets must be increasing integers (steps)")
        config = self.train_config
        stable_until = decay_start(config.steps, config.optim)
        if config.optim.warmdown_frac == 0 or budgets[-1] >= config.steps:
            raise ConfigError(f"{source}: decay_budgets need warmdown_frac > 0 and budgets below steps={config.steps}")
        for budget in budgets:
            if not config.optim.warmup_steps <= self.branch_step(budget) <= stable_until:
                raise ConfigError(
                    f"{source}: budget {budget} branches at step {self.branch_step(budget)}, "
                    f"outside the stable phase [{config.optim.warmup_steps}, {stable_until}] "
                    f"of the {config.steps}-step run"
                )

    def runs(self) -> list[GridRun]:
        specs = []
        for seed in self.seeds:
            for size, overrides in self.sizes.items():
                model_fields = {k: v for k, v in overrides.items() if k not in ("variants", "data", "train")}
                for variant in overrides.get("variants", self.variants):
                    name, fields = parse_variant(variant)
                    rates = {**overrides.get("train", {}), **self.variant_train.get(variant, {})}
                    specs.append(
                        GridRun(
                            size,
                            variant,
                            name,
                            seed,
                            {**model_fields, **fields},
                            overrides.get("data", self.data),
                            rates,
                        )
                    )
        return specs

    @property
    def train_config(self) -> TrainConfig:
        """The [train] table as a TrainConfig (seed 0, the grid's data seed)."""
        return TrainConfig.from_flat({**self.train, "data_seed": self.data_seed})

    def run_spec(self, run: GridRun) -> RunSpec:
        """What `build_run` needs for one cell of the grid."""
        train = TrainConfig.from_flat({**self.train, **run.rates, "data_seed": self.data_seed})
        return RunSpec(
            data=run.data,
            preset=self.preset,
            model=run.fields,
            train=dataclasses.replace(train, seed=run.seed),
            label_dropout=self.train.get("label_dropout", 0.1),
        )


PROSE_KEYS = ("description", "expected_minutes", "contrasts")  # what the runs do not depend on


def grid_of(path) -> dict:
    """What decides an experiment's results: the parsed file without its prose, so
    an edited comment or description does not make finished runs foreign."""
    raw = read_toml(path, "experiment file")
    return {k: v for k, v in raw.items() if k not in PROSE_KEYS}


def run_setup(experiment: Experiment) -> None:
    """Each [[setup]] step runs as its own `python -m move ...` process: the runner
    needs no knowledge of the command line, and a step's failure cannot leave this
    process in a half-changed state. Steps run every time, because the commands decide
    whether their output is already there: a data command keeps data made with the
    same options and refuses data made with others (an experiment never trains on data
    prepared for something else); a training run is resumed, which checks that it was
    started with the same config and returns at once when it is finished."""
    for step in experiment.setup:
        command = [str(c) for c in step["command"]]
        if "--out" in command:
            out = Path(command[command.index("--out") + 1])
            if (out / "run.json").exists():
                command.append("--resume")
        print(f"setup: move {' '.join(command)}", flush=True)
        if subprocess.run([sys.executable, "-m", "move", *command], check=False).returncode != 0:
            raise ConfigError(f"setup step failed: move {' '.join(command)}")
        if not Path(step["creates"]).exists():
            raise ConfigError(f"setup step `move {' '.join(command)}` did not create {step['creates']}")


def resume_possible(run_dir: Path) -> bool:
    return (run_dir / "run.json").exists() and bool(checkpoint_dirs(run_dir))


def latest_step(run_dir: Path) -> int:
    """The step of a run's newest checkpoint (0 without one)."""
    found = checkpoint_dirs(run_dir) if (run_dir / "run.json").exists() else []
    return int(found[-1].name.split("_")[1]) if found else 0


def grid_steps(experiment: "Experiment", out: Path, specs: list[GridRun]) -> tuple[int, int]:
    """(steps already trained, steps in all) over the runs and their budget branches
    (a branch trains from its branch point): the experiment's progress bar."""
    done = total = 0
    steps = experiment.train_config.steps
    for spec in specs:
        run_dir = out / "runs" / spec.key
        total += steps
        done += steps if (run_dir / "summary.json").exists() else latest_step(run_dir)
        for budget in experiment.decay_budgets:
            branch, start = budget_dir(run_dir, budget), experiment.branch_step(budget)
            total += budget - start
            done += budget - start if (branch / "summary.json").exists() else max(0, latest_step(branch) - start)
    return done, total


def run_budget_branch(experiment: Experiment, spec: GridRun, run_dir: Path, budget: int, bar: tqdm) -> bool:
    """Train (or resume, or skip) the branch of a finished run that decays to
    `budget` steps; False if it was stopped by a signal."""
    branch = budget_dir(run_dir, budget)
    if (branch / "summary.json").exists():
        return True
    source = run_dir / "checkpoints" / f"step_{experiment.branch_step(budget):06d}"
    if not resume_possible(branch) and not source.is_dir():
        raise ConfigError(
            f"{run_dir} has no checkpoint at step {experiment.branch_step(budget)} to branch the "
            f"{budget}-step budget from (was it trained without decay_budgets?); rerun with --force"
        )
    resume = resume_possible(branch)  # a branch killed before its first checkpoint restarts from source
    bar.write(f"    {spec.key}: decay to {budget} steps from step {experiment.branch_step(budget)}")
    trainer = start_training(
        experiment.run_spec(spec).with_train(steps=budget),
        branch,
        resume=resume,
        force=not resume,
        quiet=True,
        branch_from=None if resume else source,
        progress=bar,
    )
    return "stopped_at" not in trainer.run()


BUSY_POLL_SECONDS = 30.0


def run_grid_entry(experiment: Experiment, spec: GridRun, out: Path, place: str, force: bool, bar: tqdm) -> bool:
    """Train (or resume, or skip) one run of the grid with its budget branches and
    image metrics; False if a signal stopped it. DirectoryBusy: another process holds it."""
    run_dir = out / "runs" / spec.key
    bar.set_description(f"{experiment.name} [{place}]")
    if not (run_dir / "summary.json").exists() or force:
        resume = (run_dir / "run.json").exists() and not force
        trainer = start_training(
            experiment.run_spec(spec),
            run_dir,
            resume=resume,
            force=force,
            quiet=True,
            keep_steps=frozenset(experiment.branch_step(b) for b in experiment.decay_budgets),
            progress=bar,
        )
        bar.write(f"[{place}] {spec.key}: {'resuming' if resume else 'training'}")
        if "stopped_at" in trainer.run():
            bar.write(f"stopped during {spec.key}; rerun the same command to continue")
            return False
    for budget in experiment.decay_budgets:
        if not run_budget_branch(experiment, spec, run_dir, budget, bar):
            bar.write(f"stopped during {spec.key} (budget {budget}); rerun the same command to continue")
            return False
    if experiment.image:
        with DirectoryLock(run_dir, "--out"):  # one process samples a run; another passes it over (DirectoryBusy)
            bar.write(f"    {spec.key}: sample metrics")
            image_sample_metrics(run_dir, spec.data, ImageEvalSpec(**experiment.image))
    return True


def run_experiment(path, out=None, force: bool = False, only: tuple[str, ...] = (), wait: bool = True) -> Path | None:
    """Run every missing run of the grid (and its budget branches and image metrics);
    -> the results directory, or None if a signal stopped it (rerun to continue).
    only: "size/variant" cells (as in contrasts) to run now, every seed of each; the
    rest of the grid waits for a later call (the cells a decision needs, first).
    wait: when only runs another process holds are left, wait for them (so the grid is
    complete on return); False leaves them to that process and returns (frees a core)."""
    experiment = Experiment.load(path)
    out = Path(out or Path("results") / experiment.name)
    out.mkdir(parents=True, exist_ok=True)
    copy = out / "experiment.toml"
    if copy.exists() and not force and grid_of(copy) != grid_of(path):
        raise ConfigError(
            f"{out} holds results of a different experiment (its grid, data or training settings "
            f"differ); use another --out or --force"
        )
    shutil.copyfile(path, copy)
    run_setup(experiment)
    specs = experiment.runs()
    if only:
        cells = {f"{r.size}/{r.variant}" for r in specs}
        unknown = sorted(set(only) - cells)
        if unknown:
            raise ConfigError(
                f"--only {unknown[0]!r} is not a size/variant cell of the grid ({', '.join(sorted(cells))})"
            )
        specs = [r for r in specs if f"{r.size}/{r.variant}" in only]
    done, total = grid_steps(experiment, out, specs)
    done = 0 if force else done
    # one bar over every training step of the grid: its rate and ETA are the experiment's
    with tqdm(total=total, initial=done, unit="step", dynamic_ncols=True, desc=experiment.name) as bar:
        waiting = list(enumerate(specs, 1))
        while waiting:
            busy = []
            for i, spec in waiting:
                try:
                    if not run_grid_entry(experiment, spec, out, f"{i}/{len(specs)}", force, bar):
                        return None
                except DirectoryBusy:  # another process trains it: come back to it
                    busy.append((i, spec))
            if busy and not wait:
                bar.write(f"{len(busy)} run(s) are being trained by another process; left to it")
                break
            if busy:
                bar.write(f"{len(busy)} run(s) are being trained by another process; waiting for them")
                time.sleep(BUSY_POLL_SECONDS)
            waiting = busy
    return out
