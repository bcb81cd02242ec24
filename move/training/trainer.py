"""The training loop, shared by every modality.

A task supplies what is modality-specific:
    task.loader                 next_batch() -> (inputs, targets); state_dict()/load_state_dict()
    task.evaluate(model)        -> {"val_bpb": ...} (or image metrics)
    task.describe()             -> JSON-able description of data and evaluation
    task.tokens_per_example     tokens (or pixels) one example contributes, for throughput
The model is any module whose forward(inputs, targets) returns the loss and that
carries a dataclass `config`: the GPT of either modality, and the image
tokenizer and classifier (move/image), which are trained by this same loop.
Everything else is here: optimisers and schedule, gradient accumulation and
clipping, periodic evaluation, metrics.jsonl / summary.json / a loss-curve PNG,
rotating crash-safe checkpoints, exact resume, graceful stop on SIGINT/SIGTERM,
a guard against non-finite losses, and multi-process training under torchrun
(move/training/distributed.py: DDP for dense weights, row-sharded value memory,
sharded checkpoints that any number of processes resumes).

Run directory:
    config.toml       the effective config (runs started through recipes.start_training):
                      `move train --config <run>/config.toml` launches the run again
    run.json          model config, train config, task, accounting
    metrics.jsonl     one JSON object per evaluation
    summary.json      final metrics and measured cost
    loss_curve.png
    checkpoints/step_XXXXXX/   the last `keep_checkpoints` checkpoints
"""

import json
import os
import random
import re
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from move.config import RUN_CONFIG_NAME, TrainConfig
from move.device import (
    SYNC_DEBUG_ENV,
    autocast,
    peak_flops,
    peak_memory_mb,
    reset_peak_memory,
    sync_debug,
    synchronize,
)
from move.errors import CheckpointError, ConfigError, UserError
from move.files import RUN_MARKERS, DirectoryLock, atomic_write_json, atomic_write_text, check_replaceable
from move.model.accounting import summarize
from move.model.diagnostics import value_memory_diagnostics
from move.model.gpt import GPT
from move.readers import iter_lines, parse_json, read_json
from move.training import distributed
from move.training.checkpoint import (
    check_compatible,
    config_mismatch,
    first_non_finite,
    is_sharded,
    load_state_dict,
    load_train_state,
    read_header,
    save_checkpoint,
)
from move.training.curves import plot_loss_curve
from move.training.logging import Trackers
from move.training.optim import Optimizers, decay_start, lr_multiplier, prepare_for_training, value_memory_grad_mode
from move.training.sharded_checkpoint import load_sharded_checkpoint, save_sharded_checkpoint

# Steps of each session (a start or a resume) that tokens/s and MFU leave out: the first
# steps compile (torch.compile), fill caches and grow the allocator's pools.
WARMUP_STEPS = 5


class StepAborted(Exception):
    """A stop signal arrived between the micro-batches of a step (one process)."""


class NonFiniteLossError(UserError):
    """Training diverged; the newest checkpoint is still the last good one."""


def read_metrics(run_dir: Path) -> list[dict]:
    """The evaluation records of a run, in order. A last line cut short by a kill
    mid-write is dropped (resume rewrites the file up to its checkpoint)."""
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    lines = [line for _, line in iter_lines(path)] if path.exists() else []
    for i, line in enumerate(lines):
        try:
            record = parse_json(line, f"{path}:{i + 1}")
        except UserError:
            if i < len(lines) - 1:
                raise UserError(f"{path}: line {i + 1} is not JSON (the file was edited or damaged)") from None
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise UserError(f"{path}: line {i + 1} is not an evaluation record (the file was edited or damaged)")
        records.append(record)
    return records


def read_run_record(run_dir: Path) -> dict:
    """run.json of a run directory (a one-line error if it is damaged)."""
    path = Path(run_dir) / "run.json"
    try:
        record = read_json(path, "run record")
        if isinstance(record, dict) and {"model_config", "train_config"} <= record.keys():
            return record
    except UserError:
        pass
    raise UserError(f"{path}: unreadable or damaged run record; the run cannot be resumed (start it anew with --force)")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first: exactly the names save() writes, step_NNNNNN
    (temporary directories start with '.'; a user's step_000020_backup is not ours)."""
    return sorted(d for d in (Path(run_dir) / "checkpoints").glob("step_*") if re.fullmatch(r"step_\d{6,}", d.name))


def prepare_model(model, config: TrainConfig) -> None:
    """prepare_for_training with the value-memory settings of a TrainConfig."""
    prepare_for_training(
        model,
        config.value_memory_path,
        config.optim.value_memory_optimizer,
        config.value_memory_dtype,
        config.compile,
        config.row_exchange,
    )


def check_prepared(model, config: TrainConfig) -> None:
    """The Trainer does not change the model: it checks that prepare_model ran with
    this config (storage dtype, gradient mode, sharding under torchrun)."""
    if not isinstance(model, GPT):
        return
    sharded = distributed.current().active
    mode = value_memory_grad_mode(
        config.value_memory_path, config.optim.value_memory_optimizer, config.compile, sharded
    )
    for table in model.value_tables():
        if (
            table.grad_mode != mode
            or table.weight.dtype != getattr(torch, config.value_memory_dtype)
            or (table.shard is not None) != sharded
        ):
            raise ConfigError(
                "the model's value memory is not set up for this training config: call "
                "move.training.trainer.prepare_model(model, config) before the Trainer"
            )


def rng_state() -> dict:
    """Every generator's state as tensors and plain numbers only, so that a checkpoint
    loads with torch.load(weights_only=True): nothing read from disk runs code."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


class Trainer:
    def __init__(
        self,
        model,
        task,
        config: TrainConfig,
        run_dir,
        resume: bool = False,
        force: bool = False,
        quiet: bool = False,
        branch_from: Path | None = None,
        keep_steps: frozenset = frozenset(),
        launch_config: str = "",
        progress: tqdm | None = None,
    ):
        """branch_from: start a new run from this checkpoint of another run (weights,
        optimiser moments, data position, RNG, metrics so far) with this config's
        length: a warmup-stable-decay run branched in its stable phase decays to a
        shorter budget. keep_steps: checkpoints at these steps are written and never
        rotated away (the branch points of other budgets). launch_config: the run's
        effective config file (recipes.start_training), written as config.toml when the
        run directory is started. progress: a bar the steps count on instead of the
        trainer's own (an experiment's bar over its whole grid)."""
        self.launch_config = launch_config
        self.progress = progress
        self.model, self.task, self.config = model, task, config.validate()
        self.keep_steps = frozenset(keep_steps)
        self.run_dir = Path(run_dir)
        self.device = next(model.parameters()).device
        self.dist = distributed.current()
        self.quiet = quiet or not self.dist.is_main  # only rank 0 prints
        check_prepared(model, config)
        self.record = self._run_record()  # run.json, and the config the trackers show
        self.optimizers = Optimizers(model, config.optim)
        self.ddp = distributed.wrap_ddp(model, self.device) if self.dist.active else None
        self.forward_model = self.ddp or model
        if config.compile:
            self.forward_model = torch.compile(self.forward_model)
        self.step = 0
        self.train_losses: list[float] = []
        # The step never waits for the device: each step leaves (loss, gradient norm, stop
        # votes) on it, and the host reads them back at sync points (_sync_point).
        self.pending: list[torch.Tensor] = []
        self.train_time = 0.0  # seconds in training steps, warm-up included (not evaluation)
        self.timed_time, self.timed_steps = 0.0, 0  # the same after each session's warm-up steps
        self.tokens_per_step = config.batch_size * config.grad_accum * task.tokens_per_example
        self.peak_flops = peak_flops(self.device, config.peak_tflops)
        self.signal_received = False  # this process got SIGINT/SIGTERM
        self.stop_agreed = False  # some rank got one (agreed on at the sync points, the same steps on every rank)
        self.last_inputs = None
        self.lock = DirectoryLock(self.run_dir, "--out") if self.dist.is_main else None  # one writer per run
        try:
            self._prepare_run_dir(resume, force, branch_from)
        except BaseException:
            self.release()
            raise
        self.trackers = Trackers(config.loggers if self.dist.is_main else "", self.run_dir, self.record)

    # ------------------------------------------------------------------ run directory
    def release(self) -> None:
        """Give up the run directory (run() does at its end; a Trainer that is never
        run should be released by its owner)."""
        if self.lock is not None:
            self.lock.release()

    def _run_record(self) -> dict:
        return {
            "model_config": self.model.config.to_dict(),
            "train_config": self.config.to_dict(),
            "task": self.task.describe(),
            "accounting": summarize(self.model),
        }

    @property
    def stop_requested(self) -> bool:
        return self.stop_agreed if self.dist.active else self.signal_received

    def _prepare_run_dir(self, resume: bool, force: bool, branch_from: Path | None) -> None:
        record_path = self.run_dir / "run.json"
        if resume:
            if not record_path.is_file():
                raise UserError(f"{self.run_dir}: nothing to resume (no run.json)")
            self._check_same_run(read_run_record(self.run_dir))
            self._resume_latest()
        elif self.dist.is_main:
            self._start_run_dir(force)
        distributed.barrier()  # the others start once rank 0 has set the directory up
        if branch_from is not None and not resume:
            self._branch_from(Path(branch_from))

    def _branch_from(self, ckpt: Path) -> None:
        source = ckpt.parent.parent
        self._check_same_run(read_run_record(source))
        self._load_checkpoint(ckpt)
        self._truncate_metrics(self.step, source)  # the shared stable phase's records
        if self.step > decay_start(self.config.steps, self.config.optim):
            raise ConfigError(f"branch point step {self.step} lies inside the decay of a {self.config.steps}-step run")

    def _start_run_dir(self, force: bool) -> None:
        record_path = self.run_dir / "run.json"
        check_replaceable(self.run_dir, RUN_MARKERS, "a training run")
        if self.run_dir.exists() and any(self.run_dir.iterdir()):
            if not force:
                raise UserError(
                    f"{self.run_dir} already holds a run; pass --resume to continue it or --force to replace it"
                )
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.launch_config:
            atomic_write_text(self.run_dir / RUN_CONFIG_NAME, self.launch_config)
        atomic_write_json(record_path, self.record)

    def _check_same_run(self, record: dict) -> None:
        saved = type(self.model.config).from_dict(record["model_config"])
        mismatch = config_mismatch(saved, self.model.config)
        if mismatch:
            raise UserError(f"{self.run_dir}: the run was started with another model config ({mismatch})")
        # through the dataclass, so fields added since the run started take their defaults;
        # the length and the execution details may change on resume
        free = ("steps", "compile", "peak_tflops", "loggers", "log_every")
        saved_train = {
            k: v for k, v in TrainConfig.from_dict(record["train_config"]).to_dict().items() if k not in free
        }
        ours = {k: v for k, v in self.config.to_dict().items() if k not in free}
        for key in ours:
            if saved_train.get(key) != ours[key]:
                raise UserError(
                    f"{self.run_dir}: the run was started with {key}={saved_train.get(key)!r}, not {ours[key]!r}"
                )

    def _resume_latest(self) -> None:
        if self.dist.is_main:
            for stale in (self.run_dir / "checkpoints").glob(".step_*"):  # left by a kill mid-save
                shutil.rmtree(stale, ignore_errors=True)
        if not checkpoint_dirs(self.run_dir):  # stopped before its first checkpoint: start over
            self._truncate_metrics(0)
            if not self.quiet:
                print(f"{self.run_dir}: no checkpoint yet, starting from step 0")
            return
        for ckpt in reversed(checkpoint_dirs(self.run_dir)):
            try:
                self._load_checkpoint(ckpt)
            except CheckpointError as e:
                print(f"warning: skipping checkpoint {ckpt.name}: {e}", file=sys.stderr)
                continue
            self._truncate_metrics(self.step)
            if not self.quiet:
                print(f"resuming from {ckpt} (step {self.step})")
            return
        raise UserError(f"{self.run_dir}: no valid checkpoint to resume from")

    def _load_checkpoint(self, ckpt: Path) -> None:
        """The whole training state of a checkpoint (CheckpointError, nothing changed,
        if it does not verify), with any number of processes: a sharded checkpoint is
        read rank by rank, each its own rows; a one-process checkpoint (which one
        process held whole) is read by every rank, each keeping its rows."""
        if is_sharded(read_header(ckpt)):
            train_state = load_sharded_checkpoint(ckpt, self.model, self.optimizers)
        else:
            state_dict, _ = load_state_dict(ckpt)
            state_dict = distributed.local_state_dict(self.model, state_dict)
            check_compatible(self.model, state_dict, ckpt)
            train_state = load_train_state(ckpt)
            self.model.load_state_dict(state_dict)
            if "optimizer_state" in train_state:
                self.optimizers.load_named_state(train_state["optimizer_state"])
            else:  # written before optimiser state was stored by name
                self.optimizers.load_state_dicts(train_state["optimizers"])
        self.task.loader.load_state_dict(train_state["loader"])
        set_rng_state(train_state["rng"])
        self.step = train_state["step"]
        self.train_losses = train_state["train_losses"]
        self.train_time = train_state["train_time"]
        # (checkpoints written before warm-up was excluded time every step)
        self.timed_time = train_state.get("timed_time", self.train_time)
        self.timed_steps = train_state.get("timed_steps", self.step)

    def _truncate_metrics(self, step: int, source: Path | None = None) -> None:
        """metrics.jsonl = the records of `source` (default: this run) up to `step`:
        on resume, those logged after the checkpoint go (they will be logged again)."""
        if not self.dist.is_main:
            return
        keep = [m for m in read_metrics(source or self.run_dir) if m["step"] <= step]
        atomic_write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in keep))

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path | None:
        """Write a checkpoint: from this one process, or under torchrun in the sharded
        layout, every rank writing its own rows (sharded_checkpoint.py). -> its path
        (None on ranks other than 0)."""
        self._read_pending()
        path = self.run_dir / "checkpoints" / f"step_{self.step:06d}"
        meta = {"step": self.step, "task": self.task.describe()}
        # tasks whose checkpoints need a file to be used (text: the tokenizer) list it
        extra_files = self.task.checkpoint_files() if hasattr(self.task, "checkpoint_files") else {}
        train_state = {
            "step": self.step,
            "loader": self.task.loader.state_dict(),
            "rng": rng_state(),
            "train_losses": self.train_losses,
            "train_time": self.train_time,
            "timed_time": self.timed_time,
            "timed_steps": self.timed_steps,
        }
        if self.dist.active:
            path = save_sharded_checkpoint(path, self.model, self.optimizers, meta, train_state, extra_files)
        else:
            model_state = {k: v.detach() for k, v in self.model.state_dict().items()}
            bad = first_non_finite(model_state)
            if bad:  # the loss and gradient were finite, yet the update was not (e.g. a huge weight decay)
                raise NonFiniteLossError(
                    f"non-finite weights ({bad}) at step {self.step}; nothing saved, the newest "
                    f"checkpoint is the last good state"
                )
            train_state["optimizer_state"] = self.optimizers.named_state()
            path = save_checkpoint(
                path, self.model, meta=meta, train_state=train_state, state_dict=model_state, extra_files=extra_files
            )
        if not self.dist.is_main:
            return None
        rotating = [d for d in checkpoint_dirs(self.run_dir) if int(d.name[len("step_") :]) not in self.keep_steps]
        for old in rotating[: -self.config.keep_checkpoints]:
            shutil.rmtree(old)
        return path

    # ------------------------------------------------------------------ the loop
    def _train_step(self) -> None:
        """One optimiser step. Nothing here reads a device value back: the loss, the
        gradient norm and (under torchrun) the ranks' stop votes stay on the device in
        self.pending until the next sync point."""
        c = self.config
        self.optimizers.set_lr(lr_multiplier(self.step, c.steps, c.optim))
        total = torch.zeros((), device=self.device)
        loader_state = self.task.loader.state_dict() if c.grad_accum > 1 else None
        for micro in range(c.grad_accum):
            if micro and self.signal_received and not self.dist.active:
                # a stop asked for in the middle of a long accumulation: drop this step's partial
                # gradient and rewind the data, so the checkpoint is the state after the last step
                self.task.loader.load_state_dict(loader_state)
                self.model.zero_grad(set_to_none=True)
                raise StepAborted()
            x, y = self.task.loader.next_batch()
            if self.device.type == "cuda":  # page-locked, so the copy below runs asynchronously
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            self.last_inputs = x
            last = micro == c.grad_accum - 1  # DDP all-reduces on the last micro-batch only
            with self.ddp.no_sync() if self.ddp is not None and not last else nullcontext():
                with autocast(self.device):
                    loss = self.forward_model(x, targets=y)
                (loss / c.grad_accum).backward()
            total += loss.detach()
        distributed.maybe_inject_fault(self.step + 1)
        self.optimizers.reduce_shard_grads()
        # the global mean loss and how many ranks were asked to stop, summed in float64
        stats = torch.stack(
            [
                (total / c.grad_accum).double(),
                torch.full((), float(self.signal_received), dtype=torch.float64, device=self.device),
            ]
        )
        distributed.all_reduce_(stats)
        grad_norm = self.optimizers.clip()
        self.pending.append(torch.cat([stats[:1] / self.dist.world_size, grad_norm.double().reshape(1), stats[1:]]))
        self.optimizers.step()

    def _read_pending(self) -> None:
        """The sync point: read the losses, gradient norms and stop votes of the steps
        since the last one (one device-to-host copy). A non-finite loss or gradient is
        found here, before any checkpoint could save its update."""
        if not self.pending:
            return
        rows = torch.stack(self.pending).tolist()
        first = self.step - len(rows) + 1
        self.pending = []
        for i, (loss, grad_norm, _) in enumerate(rows):
            if not (np.isfinite(loss) and np.isfinite(grad_norm)):
                raise NonFiniteLossError(
                    f"non-finite loss or gradient at step {first + i} (loss {loss}); "
                    f"the newest checkpoint is the last good state"
                )
        self.train_losses.extend(loss for loss, _, _ in rows)
        self.stop_agreed = self.stop_agreed or any(votes > 0 for _, _, votes in rows)

    def _count_time(self, window: tuple[float, int], session_start: int) -> None:
        """Add the steps since `window` = (start time, step) to the training time, and
        to the timed time once they are past this session's warm-up."""
        start, start_step = window
        elapsed = time.perf_counter() - start
        self.train_time += elapsed
        if start_step >= session_start + WARMUP_STEPS:
            self.timed_time += elapsed
            self.timed_steps += self.step - start_step

    def _request_stop(self, signum, frame) -> None:
        self.signal_received = True

    @property
    def tok_per_s(self) -> float:
        """Training tokens per second after warm-up (every session's first
        WARMUP_STEPS steps: compilation, allocator growth), or over every step when the
        run had no timed steps yet."""
        if self.timed_steps and self.timed_time:
            return self.timed_steps * self.tokens_per_step / self.timed_time
        return self.step * self.tokens_per_step / self.train_time if self.train_time else 0.0

    def _throughput(self) -> dict:
        out = {"tok_per_s": self.tok_per_s}
        if self.peak_flops and "training_flops_per_token" in self.record["accounting"]:
            flops = self.record["accounting"]["training_flops_per_token"] * self.tok_per_s
            out["mfu"] = flops / (self.peak_flops * self.dist.world_size)
        return out

    def _log_eval(self) -> dict:
        metrics = self.task.evaluate(self.model)  # on every rank: a sharded table's forward is collective
        # the steps since the previous evaluation: a function of the step alone, so a
        # resumed run logs exactly what an uninterrupted one does
        since = (self.step - 1) // self.config.eval_every * self.config.eval_every
        recent = self.train_losses[since:]
        record = {
            "step": self.step,
            "tokens": self.step * self.tokens_per_step,
            "train_loss": float(np.mean(recent)) if recent else float("nan"),
            **metrics,
            **self._throughput(),
        }
        if isinstance(self.model, GPT) and self.last_inputs is not None:  # on (rank 0's slice of) the last batch
            record.update(value_memory_diagnostics(self.model, self.last_inputs))
        if not self.dist.is_main:
            return record
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.trackers.log(record, self.step)
        return record

    def run(self) -> dict:
        try:
            return self._run()
        finally:
            self.release()

    def _completed_summary(self) -> dict | None:
        """The summary of a resumed run that already finished these steps (resuming it
        is a no-op: nothing is trained, evaluated or rewritten)."""
        path = self.run_dir / "summary.json"
        if self.step != self.config.steps or not path.is_file():
            return None
        try:
            summary = read_json(path, "run summary")
        except UserError:
            return None  # damaged: the run is finished again, which rewrites it
        return summary if isinstance(summary, dict) and summary.get("steps") == self.step else None

    def _run(self) -> dict:
        c = self.config
        done = self._completed_summary()
        if done is not None:
            return done if self.dist.is_main else {}
        reset_peak_memory(self.device)
        previous = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        own_bar = self.progress is None
        bar = (
            tqdm(total=c.steps, initial=self.step, disable=self.quiet, dynamic_ncols=True, desc=self.run_dir.name)
            if own_bar
            else self.progress
        )
        session_start = self.step
        window = (time.perf_counter(), self.step)  # the steps since the last sync point
        # the GPU smoke test's check that a step never waits for the device (the first
        # step of a session, which creates optimiser state and compiles, is left out)
        debug_mode = os.environ.get(SYNC_DEBUG_ENV)
        try:
            while self.step < c.steps and not self.stop_requested:
                try:
                    with sync_debug(self.device, debug_mode if self.step > session_start else None):
                        self._train_step()
                except StepAborted:
                    self.save()
                    break
                self.step += 1
                bar.update(1)
                evaluate = self.step % c.eval_every == 0 or self.step == c.steps
                checkpoint = self.step % c.checkpoint_every == 0 or self.step == c.steps or self.step in self.keep_steps
                # (a signal makes a sync point at once in one process; under torchrun the ranks
                # agree at the next common one, as a sync point on one rank only could deadlock)
                if not (
                    evaluate
                    or checkpoint
                    or self.step % c.log_every == 0
                    or (self.signal_received and not self.dist.active)
                ):
                    continue
                # a sync point: the same steps on every rank, so the ranks agree on stopping
                self._read_pending()
                synchronize(self.device)
                self._count_time(window, session_start)
                loss = self.train_losses[-1]
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{self.tok_per_s:.0f}")
                if self.trackers.writers and self.step % c.log_every == 0:
                    self.trackers.log(
                        {"train/loss": loss, "train/lr_multiplier": lr_multiplier(self.step - 1, c.steps, c.optim)},
                        self.step,
                    )
                if evaluate:
                    record = self._log_eval()
                    if not self.quiet:  # (diagnostics go to metrics.jsonl and the trackers only)
                        bar.write(
                            " ".join(
                                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in record.items()
                                if not k.startswith("vm/")
                            )
                        )
                if checkpoint or self.stop_requested:
                    self.save()
                window = (time.perf_counter(), self.step)  # evaluation and saving are not training time
        finally:
            if own_bar:
                bar.close()
            self.trackers.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        if self.stop_requested and self.step < c.steps:
            if self.dist.is_main:
                print(f"stopped at step {self.step}; checkpoint written, continue with --resume", file=sys.stderr)
            return {"stopped_at": self.step}
        if self._needs_final_eval():  # resumed at or past --steps: nothing ran, nothing was evaluated
            self._log_eval()
        return self._finish() if self.dist.is_main else {}

    def _needs_final_eval(self) -> bool:
        """Whether metrics.jsonl lacks a record of the current step (decided on rank 0,
        agreed by every rank, since evaluation is collective)."""
        missing = self.dist.is_main and not any(m["step"] == self.step for m in read_metrics(self.run_dir))
        if self.dist.active:
            return distributed.all_reduce_sum([float(missing)], self.device)[0] > 0
        return missing

    def _finish(self) -> dict:
        metrics = read_metrics(self.run_dir)
        final = metrics[-1]
        summary = {
            **final,
            "steps": self.step,
            "tokens_seen": self.step * self.tokens_per_step,
            "train_time_s": self.train_time,
            "timed_steps": self.timed_steps,  # the steps tok_per_s and mfu are measured over
            **self._throughput(),
            "peak_memory_mb": peak_memory_mb(self.device),  # of rank 0
            "device": str(self.device),
            "world_size": self.dist.world_size,
            "cpu_threads": torch.get_num_threads(),
            "task": self.task.describe(),
            "accounting": self.record["accounting"],
            "checkpoint": str(checkpoint_dirs(self.run_dir)[-1]),
        }
        atomic_write_json(self.run_dir / "summary.json", summary)
        plot_loss_curve(self.train_losses, metrics, self.run_dir / "loss_curve.png", title=self.run_dir.name)
        return summary
