"""The shared training loop: learning, exact resume, graceful stop, guards."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from move.config import model_config_from_preset
from move.errors import CheckpointError, UserError
from move.model.accounting import param_group
from move.model.gpt import GPT
from move.text.prepare import load_prepared
from move.text.task import TextTask
from move.training.checkpoint import load_state_dict, load_train_state, save_checkpoint
from move.training.optim import OptimConfig, build_optimizers, lr_multiplier
from move.training.trainer import WARMUP_STEPS, NonFiniteLossError, TrainConfig, Trainer, checkpoint_dirs, prepare_model


def make_trainer(prepared_dir, run_dir, variant="move", steps=12, resume=False, force=False, **train_kw):
    torch.manual_seed(0)
    data = load_prepared(prepared_dir)
    model = GPT(model_config_from_preset("tiny", vocab_size=data.tokenizer.vocab_size, value_memory=variant))
    config = TrainConfig(
        steps=steps, batch_size=4, eval_every=4, eval_tokens=2048, checkpoint_every=4, keep_checkpoints=2, **train_kw
    )
    task = TextTask(data, model.config.seq_len, config.batch_size, config.seed, config.eval_tokens)
    prepare_model(model, config)
    return Trainer(model, task, config, run_dir, resume=resume, force=force, quiet=True)


class Crash(Exception):
    pass


def crash_after(trainer, n_batches, action=None):
    """Make the trainer's loader fail (or run `action`) after n more batches."""
    loader = trainer.task.loader
    original = loader.next_batch
    count = [0]

    def next_batch():
        count[0] += 1
        if count[0] > n_batches:
            if action is None:
                raise Crash()
            action()
        return original()

    loader.next_batch = next_batch


def metrics(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()  # read here, independently of read_metrics
    return [json.loads(line) for line in lines]


def test_tiny_run_lowers_loss_and_writes_its_outputs(prepared_dir, tmp_path):
    summary = make_trainer(prepared_dir, tmp_path / "run", steps=40).run()
    m = metrics(tmp_path / "run")
    assert m[-1]["val_bpb"] < m[0]["val_bpb"] - 0.3
    assert m[-1]["train_loss"] < m[0]["train_loss"]
    for key in ("step", "tokens", "train_loss", "val_bpb", "tok_per_s"):
        assert key in m[0]
    assert summary["tokens_seen"] == 40 * 4 * 64
    for name in ("run.json", "summary.json", "loss_curve.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step_000036", "step_000040"]  # keeps 2


@pytest.mark.parametrize(
    "variant,optimizer,bank",
    [
        ("move", "muon", {}),
        ("lave", "adamw", {}),
        ("standard", "muon", {}),
        # a bf16 bank keeps fp32 Adam moments: loading them must not round them to bf16
        ("move", "muon", {"value_memory_dtype": "bfloat16", "value_memory_optimizer": "exact"}),
        ("lave", "adamw", {"value_memory_dtype": "bfloat16", "value_memory_optimizer": "lazy"}),
    ],
)
def test_resume_after_a_crash_is_bit_identical(prepared_dir, tmp_path, variant, optimizer, bank):
    dtype = bank.get("value_memory_dtype", "float32")
    optim = OptimConfig(optimizer=optimizer, **{k: v for k, v in bank.items() if k != "value_memory_dtype"})
    kw = dict(optim=optim, value_memory_dtype=dtype)
    reference = make_trainer(prepared_dir, tmp_path / "ref", variant, **kw)
    reference.run()
    crashed = make_trainer(prepared_dir, tmp_path / "run", variant, **kw)
    crash_after(crashed, 10)  # dies during step 11, after the step-8 checkpoint
    with pytest.raises(Crash):
        crashed.run()
    resumed = make_trainer(prepared_dir, tmp_path / "run", variant, resume=True, **kw)
    assert resumed.step == 8
    resumed.run()
    for (name, a), b in zip(reference.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    strip = lambda ms: [{k: v for k, v in m.items() if k != "tok_per_s"} for m in ms]
    assert strip(metrics(tmp_path / "run")) == strip(metrics(tmp_path / "ref"))


def test_sigterm_finishes_the_step_checkpoints_and_stops(prepared_dir, tmp_path):
    trainer = make_trainer(prepared_dir, tmp_path / "run")
    crash_after(trainer, 5, action=lambda: os.kill(os.getpid(), signal.SIGTERM))
    result = trainer.run()
    assert result == {"stopped_at": 6}
    assert checkpoint_dirs(tmp_path / "run")[-1].name == "step_000006"
    resumed = make_trainer(prepared_dir, tmp_path / "run", resume=True)
    assert resumed.step == 6
    assert resumed.run()["steps"] == 12


def test_non_finite_loss_stops_with_the_step_named(prepared_dir, tmp_path):
    trainer = make_trainer(prepared_dir, tmp_path / "run")

    def poison():
        with torch.no_grad():
            trainer.model.lm_head.weight.fill_(float("nan"))

    crash_after(trainer, 6, action=poison)
    with pytest.raises(NonFiniteLossError, match="non-finite loss or gradient at step 7"):
        trainer.run()
    assert checkpoint_dirs(tmp_path / "run")[-1].name == "step_000004"


def test_non_finite_weights_are_never_checkpointed(prepared_dir, tmp_path):
    """Finite loss and gradient, non-finite weights after the update (what a huge
    weight decay did): no checkpoint is written, the last good one stays newest."""
    trainer = make_trainer(prepared_dir, tmp_path / "run")
    step = trainer.optimizers.step

    def poisoned_step():
        step()
        if trainer.step == 7:  # the update of step 8, right before its checkpoint
            with torch.no_grad():
                trainer.model.bank.weight[3, 0, 0, 0] = float("inf")

    trainer.optimizers.step = poisoned_step
    with pytest.raises(NonFiniteLossError, match=r"non-finite weights \(bank.weight\) at step 8"):
        trainer.run()
    assert [d.name for d in checkpoint_dirs(tmp_path / "run")] == ["step_000004"]
    with pytest.raises(CheckpointError, match=r"bank\.weight holds NaN or infinite values"):
        save_checkpoint(tmp_path / "direct", trainer.model)
    assert not (tmp_path / "direct").exists()


def test_existing_run_is_refused_unless_resume_or_force(prepared_dir, tmp_path):
    make_trainer(prepared_dir, tmp_path / "run", steps=4).run()
    with pytest.raises(UserError, match="already holds a run"):
        make_trainer(prepared_dir, tmp_path / "run", steps=4)
    assert (tmp_path / "run" / "summary.json").exists()  # nothing was touched
    with pytest.raises(UserError, match="another model config"):
        make_trainer(prepared_dir, tmp_path / "run", variant="lave", resume=True)
    make_trainer(prepared_dir, tmp_path / "run", steps=4, force=True)


def test_resume_skips_a_corrupted_newest_checkpoint(prepared_dir, tmp_path):
    make_trainer(prepared_dir, tmp_path / "run").run()
    newest = checkpoint_dirs(tmp_path / "run")[-1]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    resumed = make_trainer(prepared_dir, tmp_path / "run", resume=True)
    assert resumed.step == 8


def test_lr_schedule_warmup_constant_warmdown():
    oc = OptimConfig(warmup_steps=2, warmdown_frac=0.5)
    assert [lr_multiplier(s, 8, oc) for s in range(8)] == [0.5, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25]


def test_one_writer_per_run_directory(prepared_dir, tmp_path):
    first = make_trainer(prepared_dir, tmp_path / "run", steps=4)
    with pytest.raises(UserError, match=rf"being written by another move process \(pid {os.getpid()}\)"):
        make_trainer(prepared_dir, tmp_path / "run", steps=4, force=True)
    assert (tmp_path / "run" / "run.json").exists()  # --force did not touch the busy run
    first.run()  # releases the directory when done
    make_trainer(prepared_dir, tmp_path / "run", steps=6, resume=True).run()


def test_a_second_process_is_refused_and_a_killed_writer_leaves_no_stale_lock(prepared_dir, tmp_path):
    run = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "move",
        "train",
        "--data",
        str(prepared_dir),
        "--out",
        str(run),
        "--preset",
        "tiny",
        "--batch-size",
        "2",
        "--eval-every",
        "1000",
        "--eval-tokens",
        "256",
        "--checkpoint-every",
        "5",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    writer = subprocess.Popen(
        [*args, "--steps", "100000"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 120
        while not list(run.glob("checkpoints/step_*")) and time.time() < deadline:
            time.sleep(0.2)
        assert list(run.glob("checkpoints/step_*"))
        for extra in (["--resume"], ["--force"]):
            second = subprocess.run([*args, "--steps", "10", *extra], env=env, capture_output=True, text=True)
            assert second.returncode == 2 and f"another move process (pid {writer.pid})" in second.stderr, second.stderr
            assert len(second.stderr.strip().splitlines()) == 1
        assert (run / "run.json").exists()
    finally:
        writer.kill()
        writer.wait()
    resumed = subprocess.run([*args, "--steps", "10", "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr  # the kernel dropped the dead writer's lock


def test_a_stop_between_micro_batches_checkpoints_the_last_step_and_resumes_exactly(prepared_dir, tmp_path):
    """With many micro-batches per step a stop must not wait for the step's end: it
    drops the partial step, rewinds the data and checkpoints the last full step."""
    reference = make_trainer(prepared_dir, tmp_path / "ref", steps=6, grad_accum=4)
    reference.run()
    trainer = make_trainer(prepared_dir, tmp_path / "run", steps=6, grad_accum=4)
    crash_after(trainer, 4 * 3 + 2, action=lambda: setattr(trainer, "signal_received", True))  # inside step 4
    assert trainer.run() == {"stopped_at": 3}
    assert checkpoint_dirs(tmp_path / "run")[-1].name == "step_000003"
    make_trainer(prepared_dir, tmp_path / "run", steps=6, grad_accum=4, resume=True).run()
    ours, _ = load_state_dict(checkpoint_dirs(tmp_path / "run")[-1])
    theirs, _ = load_state_dict(checkpoint_dirs(tmp_path / "ref")[-1])
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("variant, density, slots", [("move", 1, 2), ("move", 4, 8), ("lave", 2, 2)])
def test_per_slot_bank_rate_divides_by_the_slots_a_layer_mixes(variant, density, slots):
    config = model_config_from_preset("small", value_memory=variant, memory_density=density, vocab_size=64)
    model = GPT(config)
    bank = {id(p) for name, p in model.named_parameters() if param_group(name) == "value_memory"}
    assert bank

    def bank_rate(per_slot):
        optimizers = build_optimizers(model, OptimConfig(lr_value_memory=0.2, value_memory_lr_per_slot=per_slot))
        rates = {g["lr"] for opt in optimizers for g in opt.param_groups if any(id(p) in bank for p in g["params"])}
        assert len(rates) == 1
        return rates.pop()

    width_scale = (config.n_embd / 768) ** -0.5  # the AdamW rate transfer of every embedding-like table
    assert bank_rate(False) == pytest.approx(0.2 * width_scale)
    assert bank_rate(True) == pytest.approx(0.2 * width_scale / slots)


def test_resuming_a_finished_run_returns_its_summary_and_rewrites_nothing(prepared_dir, tmp_path):
    import hashlib

    first = make_trainer(prepared_dir, tmp_path / "run", steps=4).run()
    files = sorted(p for p in (tmp_path / "run").rglob("*") if p.is_file() and not p.name.endswith(".lock"))
    digest = lambda: [hashlib.sha256(p.read_bytes()).hexdigest() for p in files]
    before = digest()
    again = make_trainer(prepared_dir, tmp_path / "run", steps=4, resume=True).run()
    assert again == json.loads(json.dumps(first)) and digest() == before
    longer = make_trainer(prepared_dir, tmp_path / "run", steps=6, resume=True).run()  # more steps: it continues
    assert longer["steps"] == 6


@pytest.mark.parametrize("offset", [-1, 1])
def test_a_model_built_for_another_vocabulary_is_refused(prepared_dir, tmp_path, offset, capsys):
    """api.build_model(vocab_size=...) trained on data of another vocabulary is an error
    (larger used to pass silently: rows never trained, counted as parameters), and the
    api prints nothing into a notebook."""
    from move import api

    vocab = load_prepared(prepared_dir).tokenizer.vocab_size
    with pytest.raises(UserError, match=f"does not match the data's tokenizer .*vocab_size={vocab}"):
        api.train(api.build_model("tiny", vocab_size=vocab + offset), prepared_dir, tmp_path / "r", steps=1)
    summary = api.train(
        api.build_model("tiny", vocab_size=vocab),
        prepared_dir,
        tmp_path / "ok",
        steps=2,
        batch_size=2,
        eval_every=2,
        eval_tokens=256,
        quiet=True,
    )
    assert summary["steps"] == 2 and capsys.readouterr().out == ""


@pytest.mark.parametrize(
    "variant, optimizer", [("standard", "exact"), ("move", "exact"), ("move", "lazy"), ("lave", "exact")]
)
def test_a_training_step_reads_nothing_back_from_the_device(prepared_dir, tmp_path, monkeypatch, variant, optimizer):
    """On a GPU every read of a tensor's value by the host (item, tolist, bool, float,
    int) waits for the device. The step leaves its loss, gradient norm and stop votes
    on the device; the host reads them at sync points (every log_every steps)."""
    trainer = make_trainer(
        prepared_dir, tmp_path / "run", variant=variant, optim=OptimConfig(value_memory_optimizer=optimizer)
    )

    def refuse(self, *args):
        raise AssertionError("a host read of a device value inside the training step")

    with monkeypatch.context() as m:
        for method in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
            m.setattr(torch.Tensor, method, refuse)
        for _ in range(3):
            trainer._train_step()
            trainer.step += 1
    assert len(trainer.pending) == 3 and not trainer.train_losses
    trainer._read_pending()
    assert len(trainer.train_losses) == 3 and all(math.isfinite(x) for x in trainer.train_losses)
    trainer.release()


def test_non_finite_losses_are_caught_at_the_next_sync_point_before_any_checkpoint(prepared_dir, tmp_path):
    trainer = make_trainer(prepared_dir, tmp_path / "run", steps=8, log_every=2)
    original = trainer.forward_model

    def poisoned(x, targets):
        loss = original(x, targets=targets)
        return loss * float("nan") if trainer.step == 4 else loss  # step 5 goes bad

    trainer.forward_model = poisoned
    with pytest.raises(NonFiniteLossError, match="non-finite loss or gradient at step 5"):
        trainer.run()
    assert [d.name for d in checkpoint_dirs(tmp_path / "run")] == ["step_000004"]  # the last good state


def test_tokens_per_second_leave_out_the_warm_up_steps(prepared_dir, tmp_path):
    """A slow first step (compilation, say) counts in train_time_s, not in tok_per_s:
    sync points every 5 steps, so the steps timed are 5-20 (WARMUP_STEPS = 5)."""
    assert WARMUP_STEPS == 5
    trainer = make_trainer(prepared_dir, tmp_path / "run", steps=20, log_every=5)
    trainer.config.eval_every = trainer.config.checkpoint_every = 10
    original = trainer._train_step

    def slow_first_step():
        if trainer.step == 0:
            time.sleep(1.0)
        original()

    trainer._train_step = slow_first_step
    summary = trainer.run()
    assert summary["timed_steps"] == 15
    timed_time = 15 * trainer.tokens_per_step / summary["tok_per_s"]
    assert timed_time <= summary["train_time_s"] - 1.0


def test_a_checkpoint_with_position_indexed_optimiser_state_still_resumes(prepared_dir, tmp_path):
    """Checkpoints written before optimiser state was stored by name kept a list of
    optimizer.state_dict()s: rewritten that way, the step-8 checkpoint resumes to the
    same weights as the one stored by name."""
    make_trainer(prepared_dir, tmp_path / "run", steps=8).run()
    ckpt = checkpoint_dirs(tmp_path / "run")[-1]
    state, header = load_state_dict(ckpt)
    train_state = load_train_state(ckpt)
    old = make_trainer(prepared_dir, tmp_path / "scratch", steps=8)
    old.optimizers.load_named_state(train_state.pop("optimizer_state"))
    train_state["optimizers"] = [opt.state_dict() for opt in old.optimizers.optimizers]
    old.release()
    shutil.copytree(tmp_path / "run", tmp_path / "old")
    save_checkpoint(
        tmp_path / "old" / "checkpoints" / ckpt.name,
        old.model,
        meta=header["meta"],
        train_state=train_state,
        state_dict=state,
    )
    finished = {}
    for name in ("run", "old"):
        (tmp_path / name / "summary.json").unlink()
        trainer = make_trainer(prepared_dir, tmp_path / name, steps=12, resume=True)
        assert trainer.step == 8
        trainer.run()
        finished[name] = trainer.model.state_dict()
    assert all(torch.equal(finished["run"][k], finished["old"][k]) for k in finished["run"])
