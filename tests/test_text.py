"""Text pipeline: tokenizer, corpora readers, prepared data, loader, bits per byte."""

import functools
import hashlib
import json
import math
import operator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from move.config import ModelConfig
from move.errors import DataError
from move.evaluation.bpb import bits_per_byte
from move.model.gpt import GPT
from move.text.corpora import iter_documents
from move.text.loader import BatchLoader, eval_windows, sliding_windows
from move.text.prepare import PrepareOptions, load_prepared, passages, prepare, split_documents
from move.text.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(prepared_dir):
    return load_prepared(prepared_dir).tokenizer


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_tokenizer_round_trips_arbitrary_unicode(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.bos_id not in ids
    assert tokenizer.decode(ids) == text
    # the byte count used by bpb is the UTF-8 length of the text
    assert int(tokenizer.token_bytes()[ids].sum()) == len(text.encode("utf-8"))


def test_bos_string_in_text_is_not_a_bos_token(tokenizer):
    assert tokenizer.bos_id not in tokenizer.encode("a <|bos|> b")


def test_gpt2_vocabulary_is_available_offline():
    gpt2 = Tokenizer.gpt2()
    assert gpt2.vocab_size == 50257 and gpt2.bos_id == 50256
    assert gpt2.encode("Hello world") == [15496, 995]  # GPT-2's well-known ids


def test_bits_per_byte_on_a_hand_computed_case():
    # lm_head = 0 -> uniform predictions over V = 8: every target costs ln 8 nats
    model = GPT(ModelConfig(vocab_size=8, seq_len=4, n_layer=1, n_embd=32, n_head=2))
    torch.nn.init.zeros_(model.lm_head.weight)
    token_bytes = torch.tensor([0, 1, 2, 3, 4, 1, 1, 1])  # id 0 is BOS: 0 bytes
    x = torch.tensor([[0, 1, 2, 0]])
    y = torch.tensor([[1, 3, 0, 4]])  # bytes 1 + 3 + (BOS excluded) + 4 = 8, three scored targets
    expected = 3 * math.log(8) / (math.log(2) * 8)  # = 9/8
    assert bits_per_byte(model, [(x, y)], token_bytes) == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(1.125)


def test_split_is_deterministic_and_keeps_both_sides():
    ids = [f"doc{i}" for i in range(200)]
    val = split_documents(ids, 0.1)
    assert val == split_documents(list(reversed(ids)), 0.1)
    assert 5 < len(val) < 40
    assert len(split_documents(["a", "b"], 0.01)) == 1  # never an empty validation split


def test_passages_respect_the_budget_and_keep_every_token():
    lines = [[1] * 5, [2] * 3, [3] * 12, [4] * 2]
    out = passages(lines, 6)
    assert all(len(p) <= 6 for p in out)
    assert functools.reduce(operator.iadd, out, []) == functools.reduce(operator.iadd, lines, [])


def test_prepared_data_manifest_and_bos_alignment(prepared_dir):
    data = load_prepared(prepared_dir)
    m = data.manifest
    assert m["dtype"] == "uint16" and m["splits"]["val"]["documents"] == 1
    train = data.tokens("train")
    assert train[0] == data.tokenizer.bos_id
    assert len(train) == m["splits"]["train"]["tokens"]
    # what bpb divides by is the corpus's real UTF-8 size
    token_bytes = data.tokenizer.token_bytes()
    assert int(token_bytes[np.asarray(data.tokens("val"))].sum()) == m["splits"]["val"]["text_bytes"]


def test_data_made_before_an_option_existed_is_kept_and_another_value_refused(prepared_copy, text_folder):
    """A manifest written before an option was added lacks it; the data was made with
    the option's default, so the same prepare command keeps it (an experiment's set-up
    reruns it every time)."""
    from move.errors import DataError

    manifest = json.loads((prepared_copy / "manifest.json").read_text())
    del manifest["options"]["tokenizer_chars"]  # as a version before the option wrote it
    (prepared_copy / "manifest.json").write_text(json.dumps(manifest))
    same = dict(source="txt", path=str(text_folder), vocab_size=512, val_fraction=0.25, passage_tokens=64)
    assert prepare(PrepareOptions(**same), prepared_copy)["options"] == manifest["options"]
    with pytest.raises(DataError, match="tokenizer_chars: 50000000, not 1000"):
        prepare(PrepareOptions(**same, tokenizer_chars=1000), prepared_copy)


def test_corrupted_shard_is_caught(prepared_copy):
    shard = prepared_copy / "train.bin"
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="checksum does not match"):
        load_prepared(prepared_copy)


def test_token_ids_outside_the_vocabulary_are_caught_once_at_load(prepared_copy):
    """Training relies on this check (the model's forward does not range-check ids):
    a shard whose checksum is consistent but which holds an id past the vocabulary."""
    shard = prepared_copy / "train.bin"
    tokens = np.fromfile(shard, dtype=np.uint16)
    vocab = load_prepared(prepared_copy).tokenizer.vocab_size
    tokens[7] = vocab
    tokens.tofile(shard)
    manifest = json.loads((prepared_copy / "manifest.json").read_text())
    manifest["splits"]["train"]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (prepared_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=f"token id {vocab} is outside the tokenizer's vocabulary of {vocab}"):
        load_prepared(prepared_copy)


def test_foreign_tokenizer_is_caught(prepared_copy):
    Tokenizer.train(["some other text entirely"] * 20, 300).save(prepared_copy)
    with pytest.raises(DataError, match="does not match the tokenizer"):
        load_prepared(prepared_copy)


def test_truncated_shard_is_caught(prepared_copy):
    shard = prepared_copy / "val.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"val\.bin: size"):
        load_prepared(prepared_copy)


def test_loader_is_bos_aligned_seeded_and_resumes_exactly(prepared_dir):
    data = load_prepared(prepared_dir)
    tokens, bos = data.tokens("train"), data.tokenizer.bos_id
    a = BatchLoader(tokens, bos, 4, 32, seed=1)
    batches = [a.next_batch() for _ in range(5)]
    assert all((x[:, 0] == bos).all() for x, _ in batches)
    assert all(torch.equal(x[:, 1:], y[:, :-1]) for x, y in batches)
    state = None
    b = BatchLoader(tokens, bos, 4, 32, seed=1)
    for i in range(5):
        if i == 2:
            state = json.loads(json.dumps(b.state_dict()))  # survives serialisation
        b.next_batch()
    c = BatchLoader(tokens, bos, 4, 32, seed=1)
    c.load_state_dict(state)
    for x, y in batches[2:]:
        cx, cy = c.next_batch()
        assert torch.equal(cx, x) and torch.equal(cy, y)
    other = BatchLoader(tokens, bos, 4, 32, seed=2).next_batch()[0]
    assert not torch.equal(other, batches[0][0])


def test_loader_crosses_epochs_and_two_ranks_split_one_global_batch(prepared_dir):
    data = load_prepared(prepared_dir)
    tokens, bos = data.tokens("train"), data.tokenizer.bos_id
    one = BatchLoader(tokens, bos, 8, 32, seed=0)
    ranks = [BatchLoader(tokens, bos, 4, 32, seed=0, rank=r, world_size=2) for r in range(2)]
    n_starts = len(one.starts)
    for _ in range(n_starts // 8 + 3):  # past the end of an epoch
        x = one.next_batch()[0]
        assert torch.equal(torch.cat([r.next_batch()[0] for r in ranks]), x)
    assert one.sampler.epoch == 1


def test_eval_windows_score_every_token_once():
    tokens = np.arange(103)
    xs, ys = zip(*eval_windows(tokens, 10, 10**6, 4))
    y = torch.cat(ys).flatten()
    assert torch.equal(y, torch.arange(1, 101))
    assert torch.equal(torch.cat(xs).flatten(), torch.arange(0, 100))


def test_corpus_readers(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "first doc"}\n\n{"text": "second"}\n')
    assert [t for _, t in iter_documents("jsonl", str(tmp_path / "a.jsonl"))] == ["first doc", "second"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["x y", "", "z"], "id": [1, 2, 3]}), tmp_path / "shard.parquet")
    assert [t for _, t in iter_documents("parquet", str(tmp_path))] == ["x y", "z"]
    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "good.txt").write_text("good text")
    (folder / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    assert [d for d, _ in iter_documents("txt", str(folder))] == ["good.txt"]  # bad one skipped with a warning
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no non-empty documents"):
        list(iter_documents("txt", str(tmp_path / "empty")))
    with pytest.raises(DataError, match="no such file or directory"):
        list(iter_documents("txt", str(tmp_path / "missing")))


@pytest.mark.parametrize("source", ["news", "bible"])
def test_bundled_corpora_are_readable(source):
    docs = iter_documents(source)
    first = [next(docs) for _ in range(3)]
    assert all(len(text) > 100 for _, text in first)


def test_a_single_document_corpus_gets_a_validation_tail(tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    text = "".join(f"Line {i} of the only book, with some words in it.\n" for i in range(3000))
    (folder / "book.txt").write_text(text)
    m = prepare(
        PrepareOptions(source="txt", path=str(folder), vocab_size=300, val_fraction=0.1, passage_tokens=64),
        tmp_path / "data",
    )
    train, val = m["splits"]["train"], m["splits"]["val"]
    assert (
        train["documents"] == val["documents"] == 1 and 0.05 < val["tokens"] / (train["tokens"] + val["tokens"]) < 0.15
    )
    assert train["text_bytes"] + val["text_bytes"] == len(text.encode())
    data = load_prepared(tmp_path / "data")
    tok = data.tokenizer
    decoded = "".join(tok.decode([int(t) for t in data.tokens(s) if t != tok.bos_id]) for s in ("train", "val"))
    assert decoded == text  # the tail is the end of the book: nothing lost, nothing repeated


def test_passages_of_a_huge_line_take_linear_time_and_keep_every_token():
    """Counting operations, not seconds: the grouper touches each token a bounded
    number of times however long the line (it used to re-slice the rest per piece)."""
    from move.text.prepare import PassageGrouper

    class CountingList(list):
        copied = 0

        def __getitem__(self, item):
            out = super().__getitem__(item)
            if isinstance(item, slice):
                CountingList.copied += len(out)
            return out

    for n in (10_000, 100_000):
        CountingList.copied = 0
        grouper = PassageGrouper(256)
        out = grouper.add(CountingList(range(n))) + grouper.finish()
        assert [t for p in out for t in p] == list(range(n))
        assert CountingList.copied <= n  # each token sliced out once


def test_bounded_lines_cut_long_lines_at_spaces_and_lose_nothing():
    from move.text.prepare import MAX_LINE_CHARS, bounded_lines

    text = ("word " * (3 * MAX_LINE_CHARS // 5)) + "\nshort\n" + "x" * (2 * MAX_LINE_CHARS + 7)
    pieces = list(bounded_lines(text))
    assert "".join(pieces) == text and max(map(len, pieces)) <= MAX_LINE_CHARS
    assert pieces[0].endswith(" ")  # cut after a space, not inside a word


@pytest.mark.parametrize("n,seq_len,stride", [(50, 8, 3), (9, 8, 4), (100, 16, 15), (17, 16, 1), (3, 8, 4)])
def test_sliding_windows_score_every_target_once_with_enough_context(n, seq_len, stride):
    tokens = np.arange(n) + 100  # token t sits at position t - 100
    scored = []
    for x, y in sliding_windows(tokens, seq_len, stride, max_tokens=10**9, batch_size=3):
        assert x.shape == y.shape and x.shape[1] <= seq_len - 1
        for row_x, row_y in zip(x, y):
            for i in (row_y >= 0).nonzero().flatten().tolist():
                position = int(row_y[i]) - 100
                context = i + 1  # inputs row_x[0..i] precede the target
                assert int(row_x[i]) - 100 == position - 1
                assert context == position or context >= seq_len - stride
                scored.append(position)
    assert sorted(scored) == list(range(1, n))


def test_sliding_windows_refuse_a_stride_that_would_leave_tokens_unscored():
    with pytest.raises(DataError, match="stride"):
        next(sliding_windows(np.arange(40), 8, 8, max_tokens=10**9, batch_size=2))
