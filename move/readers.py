"""Readers of files a user hands us, which treat every file as hostile.

Each reader either gives what a user would expect from the file or raises DataError
with one line naming the file (and the line or field): never a traceback. The classes
of hostile input handled here, once for every caller:

- encodings: UTF-8 with or without a byte-order mark (some editors write one); any
  other bytes are refused with the offset of the first bad byte;
- nesting: JSON or TOML nested deeper than Python's recursion allows;
- huge numbers: integers of more digits than Python converts (4,300 by default);
- huge lines and files: a JSONL line or a metadata file beyond a stated size is
  refused before it is read into memory;
- structure: a parsed file whose fields are missing or of the wrong type (fields_of).
The json and tomllib parsers do the parsing; this module only maps their failures
(and the interpreter's limits they run into) to one-line errors.
"""

import json
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from move.errors import DataError

# A JSON or TOML file that describes something (a manifest, a header, a config, an
# experiment) is small; one beyond this is not one of ours, whatever its name.
MAX_METADATA_BYTES = 64 * 2**20
# A text given whole on the command line (move eval --text): held in memory at once.
MAX_TEXT_BYTES = 2**30
# One record of a JSONL corpus (a document); longer lines are refused, not read whole.
MAX_JSONL_LINE_BYTES = 256 * 2**20


def decode_text(data: bytes, where) -> str:
    """UTF-8 text, a leading byte-order mark dropped (utf-8-sig)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text (byte {e.start})") from None


def _number_or_nesting(error: Exception) -> str | None:
    """The interpreter limit a parser hit, in words, or None for another error."""
    if isinstance(error, RecursionError):
        return "nested too deeply"
    if isinstance(error, ValueError) and "integer string conversion" in str(error):
        return "holds an integer with too many digits"
    return None


def read_text(path, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """A whole UTF-8 text file (a byte-order mark dropped), refused in one line when it
    is missing, larger than max_bytes or not UTF-8."""
    return decode_text(read_bytes(path, max_bytes, "text file"), path)


def _parse(text: str | bytes, where, loads, syntax_error: type, kind: str, reason):
    """loads(text) for a user's file, its failures as one-line DataErrors."""
    if isinstance(text, bytes):
        text = decode_text(text, where)
    try:
        return loads(text.removeprefix("\ufeff"))
    except syntax_error as e:  # before ValueError: both parsers' errors are ValueErrors
        raise DataError(f"{where}: not valid {kind} ({reason(e)})") from None
    except (RecursionError, ValueError) as e:
        limit = _number_or_nesting(e)
        if limit is None:
            raise
        raise DataError(f"{where}: not usable {kind} ({limit})") from None


def parse_json(text: str | bytes, where):
    """The JSON value of `text`; `where` names the file (and line) in the error."""
    reason = lambda e: f"{e.msg} at line {e.lineno}, column {e.colno}"
    return _parse(text, where, json.loads, json.JSONDecodeError, "JSON", reason)


def first_line(error: Exception) -> str:
    """A library's error message cut to one line (its class name when it has none)."""
    return (str(error).splitlines() or [error.__class__.__name__])[0]


def _unreadable(path, what: str, error: OSError) -> DataError:
    """The one-line error for a file the file system would not give us."""
    reason = "a directory" if isinstance(error, IsADirectoryError) else error.strerror or error.__class__.__name__
    return DataError(f"{path}: cannot read the {what} ({reason})")


def read_bytes(path, max_bytes: int = MAX_METADATA_BYTES, what: str = "file") -> bytes:
    """A file's bytes, refused in one line when it is missing, unreadable or larger
    than max_bytes (checked before reading)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise DataError(f"{path}: cannot read the {what} ({size:,} bytes; a {what} has at most {max_bytes:,})")
        return path.read_bytes()
    except OSError as e:
        raise _unreadable(path, what, e) from None


def read_json(path, what: str = "JSON file"):
    """The JSON value of a (small) file."""
    return parse_json(read_bytes(path, what=what), path)


def read_json_object(path, what: str = "JSON file") -> dict:
    """A file whose JSON value must be an object."""
    value = read_json(path, what)
    if not isinstance(value, dict):
        raise DataError(f"{path}: not a {what} (a JSON {type(value).__name__}, not an object)")
    return value


def parse_toml(text: str | bytes, where) -> dict:
    """The TOML document `text` as a dict."""
    return _parse(text, where, tomllib.loads, tomllib.TOMLDecodeError, "TOML", str)


def read_toml(path, what: str = "TOML file") -> dict:
    return parse_toml(read_bytes(path, what=what), path)


def iter_lines(path, max_line_bytes: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, bytes) of a text file, one line at a time, a leading UTF-8
    byte-order mark dropped; a line longer than max_line_bytes is refused before it is
    read whole. The caller decodes (decode_text), so it decides what a bad line means."""
    path = Path(path)
    max_line_bytes = max_line_bytes or MAX_JSONL_LINE_BYTES
    try:
        with open(path, "rb") as f:
            number = 0
            while line := f.readline(max_line_bytes + 1):
                number += 1
                if len(line) > max_line_bytes and not line.endswith(b"\n"):
                    raise DataError(f"{path}:{number}: line longer than {max_line_bytes:,} bytes")
                yield number, line.removeprefix(b"\xef\xbb\xbf") if number == 1 else line
    except OSError as e:
        raise _unreadable(path, "text file", e) from None


@contextmanager
def fields_of(where):
    """Reading the fields of a parsed user file (a manifest, a header): a field that is
    missing or of the wrong type ends the block as one DataError naming the file, not
    as the KeyError or TypeError of whichever line met it first."""
    try:
        yield
    except KeyError as e:
        raise DataError(f"{where}: damaged (missing field {e})") from None
    except (TypeError, AttributeError, IndexError, ValueError) as e:
        raise DataError(f"{where}: damaged (a field of the wrong type or value: {e})") from None


def inner_file_name(name, where) -> str:
    """A file name a manifest or header lists, which must name a file inside its folder
    (sub-folders allowed, as DCP's dcp/.metadata): an absolute path, an empty part or
    a part that climbs out (..) is refused."""
    parts = name.split("/") if isinstance(name, str) and "\\" not in name else [""]
    if not all(part and part not in (".", "..") for part in parts):
        raise DataError(f"{where}: {name!r} is not the name of a file inside the folder")
    return name
