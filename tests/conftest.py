"""Fixtures for tests that damage data (the shared ones are in ../conftest.py)."""

import shutil

import pytest


@pytest.fixture
def prepared_copy(tmp_path, prepared_dir):
    """A private copy for tests that damage the data."""
    copy = tmp_path / "data"
    shutil.copytree(prepared_dir, copy)
    return copy
