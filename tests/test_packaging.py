"""The distribution: `python -m build` makes an sdist and a wheel, and the wheel alone,
installed into a fresh virtual environment, answers `move --help` and trains.

The fresh environment gets the project only from the wheel: its dependencies (torch
and the rest) come from the test environment's site-packages through a .pth line,
which adds that folder to sys.path without running its .pth files, so the editable
install of this checkout is not visible there."""

import importlib.util
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import move

ROOT = Path(__file__).resolve().parent.parent


def run(command, **kwargs):
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-3000:])
    return result


def test_wheel_installs_into_a_fresh_venv_and_trains(tmp_path, prepared_dir):
    if importlib.util.find_spec("build") is None:
        pytest.skip("the build package is not installed (it comes with the test extras)")
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, ROOT])
    (wheel,) = dist.glob("mixture_of_value_embeddings-*.whl")
    (sdist,) = dist.glob("mixture_of_value_embeddings-*.tar.gz")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert "move/export/hf_modeling_template.py" in names and "move/config.py" in names
    assert not any(n.startswith(("tests/", "results/")) for n in names)
    with tarfile.open(sdist) as t:
        assert any(n.endswith("/README.md") for n in t.getnames())

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    (site / "test_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel])

    found = run([python, "-c", "import move; print(move.__file__)"], cwd=tmp_path).stdout.strip()
    assert Path(found).is_relative_to(site), found  # the wheel's copy, not this checkout
    command = venv / "bin" / "move"
    assert "usage: move" in run([command, "--help"], cwd=tmp_path).stdout
    version = run([command, "--version"], cwd=tmp_path).stdout.strip()
    assert version == f"move {move.__version__} (mixture-of-value-embeddings)"
    train = [command, "train", "--data", prepared_dir, "--out", tmp_path / "run", "--preset", "tiny"]
    run(
        [*train, "--variant", "move", "--steps", "3", "--batch-size", "2", "--eval-every", "3", "--eval-tokens", "256"],
        cwd=tmp_path,
    )
    assert (tmp_path / "run" / "summary.json").is_file()
