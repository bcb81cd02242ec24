"""The documentation: a short README front page whose links resolve, and a docs site
that builds with `mkdocs build --strict` (a broken link, a missing page or a page left
out of the navigation fails)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


def test_readme_front_page_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    targets = [m.group(1) for m in LINK.finditer(text) if "://" not in m.group(1)]
    assert len(targets) > 10
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, missing


def test_docs_site_builds_strictly(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    if mkdocs is None:
        pytest.skip("mkdocs is not installed (it comes with the test extras: pip install -e '.[test]')")
    result = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # every page of the navigation is built, and the committed reports the pages cite come along
    for page in ("using", "api", "experiments", "benchmarks", "troubleshooting"):
        assert (tmp_path / "site" / page / "index.html").is_file(), page
    assert (tmp_path / "site" / "results" / "news-cpu" / "report" / "index.html").is_file()
