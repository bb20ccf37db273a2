"""Reading raw inputs: files and directories -> `Record`s (or `BadInput`s), in order.

Sources (`--data.inputs=PATH[,PATH...]`; directories are walked in sorted order):

    .txt .md .py ...   one document per file (`--data.text_extensions`), read as
                       bytes and decoded as strict UTF-8 (line endings kept)
    .jsonl / .json     JSON Lines, streamed line by line through the `datasets`
                       text builder; a .json file whose first character is `[` is
                       a JSON array, parsed whole (arrays cannot be streamed)
    .csv / .parquet    streamed through the `datasets` csv / parquet builders
    save_to_disk dir   `datasets.load_from_disk` (memory-mapped Arrow)

A file named explicitly in --data.inputs with another extension is read as plain
text; inside directories, other files are ignored.

Nothing is loaded whole except JSON arrays, so corpora larger than memory stream.
Every record has a stable `name` (relative path + line/row, or + 1-based index
for the elements of a JSON array, so a one-line array splits like the same
records as JSON Lines: the name decides the train/validation split) and a `where` (`path:N`, N = line for text formats and
CSV, 1-based row for Parquet/Arrow) for the report. Malformed JSON and
undecodable bytes become `BadInput`s; what to do with them is the caller's call.

Example:
    >>> for item in read_inputs(["corpus/"], (".txt",)):
    ...     print(item.where)
    corpus/a.jsonl:1
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator

from deepseek_tf.errors import UserError

JSON_EXTENSIONS = (".json", ".jsonl")
TABLE_EXTENSIONS = (".csv", ".parquet")


@dataclasses.dataclass(frozen=True)
class Record:
    """One input sample: a dict (JSON/CSV/Parquet/datasets row) or a plain file's text."""

    name: str
    where: str
    value: dict | str


@dataclasses.dataclass(frozen=True)
class BadInput:
    """Input that could not be used: where (file:line), a kind for counting, and why.

    Kinds: undecodable, malformed_json, unreadable_file, missing_field, bad_sample.
    """

    where: str
    kind: str
    reason: str


def _is_hf_dir(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))


@dataclasses.dataclass(frozen=True)
class Source:
    path: str   # the file (or save_to_disk directory)
    name: str   # stable name: relative to the input it was found under
    kind: str   # plain | json | csv | parquet | hf


def _kind(path: str, text_extensions: tuple[str, ...]) -> str | None:
    if _is_hf_dir(path):
        return "hf"
    ext = os.path.splitext(path)[1].lower()
    if ext in JSON_EXTENSIONS:
        return "json"
    if ext in TABLE_EXTENSIONS:
        return ext[1:]
    if ext in text_extensions:
        return "plain"
    return None


def find_sources(inputs: tuple[str, ...], text_extensions: tuple[str, ...]) -> list[Source]:
    """Expands files and directories into sources, in a deterministic order."""
    out = []
    for inp in inputs:
        if not os.path.exists(inp):
            raise UserError(f"--data.inputs: {inp} does not exist.")
        if os.path.isfile(inp) or _is_hf_dir(inp):
            kind = _kind(inp, text_extensions) or "plain"
            out.append(Source(inp, os.path.basename(os.path.normpath(inp)), kind))
            continue
        found = []
        for dirpath, dirnames, filenames in os.walk(inp):
            hf = sorted(d for d in dirnames if _is_hf_dir(os.path.join(dirpath, d)))
            dirnames[:] = sorted(d for d in dirnames if d not in hf and not d.startswith("."))
            for name in hf + sorted(f for f in filenames if not f.startswith(".")):
                path = os.path.join(dirpath, name)
                kind = _kind(path, text_extensions)
                if kind:
                    rel = os.path.relpath(path, inp).replace(os.sep, "/")
                    found.append(Source(path, rel, kind))
        if not found:
            raise UserError(f"--data.inputs: {inp} holds no readable files (extensions "
                            f"{', '.join(JSON_EXTENSIONS + TABLE_EXTENSIONS + text_extensions)}"
                            f" or a save_to_disk directory).")
        out += sorted(found, key=lambda s: s.name)
    return out


def fingerprint_entries(sources: list[Source]) -> list[list]:
    """(name, size, mtime) of every input file: cheap identity for resuming."""
    entries = []
    for s in sources:
        files = [s.path] if os.path.isfile(s.path) else sorted(
            os.path.join(d, f) for d, _, fs in os.walk(s.path) for f in fs)
        for f in files:
            st = os.stat(f)
            entries.append([os.path.relpath(f, os.path.dirname(s.path)), st.st_size,
                            st.st_mtime_ns])
    return entries


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def decode_utf8(data: bytes, name: str, where: str) -> Record | BadInput:
    """Strict UTF-8; the first bad byte is reported as file:line."""
    try:
        return Record(name, where, data.decode("utf-8"))
    except UnicodeDecodeError as e:
        return BadInput(f"{where}:{_line_of(data, e.start)}", "undecodable",
                        f"undecodable bytes (invalid UTF-8 at byte {e.start})")


def _read_plain(src: Source) -> Iterator[Record | BadInput]:
    with open(src.path, "rb") as f:
        yield decode_utf8(f.read(), src.name, src.path)


def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    return datasets


def _parse_json_line(raw: str, src: Source, line: int) -> Record | BadInput | None:
    where = f"{src.path}:{line}"
    try:
        text = raw.encode("latin-1").decode("utf-8")  # latin-1 carried the raw bytes
    except UnicodeDecodeError as e:
        return BadInput(where, "undecodable",
                        f"undecodable bytes (invalid UTF-8 at column {e.start + 1})")
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return BadInput(where, "malformed_json",
                        f"malformed JSON: {e.msg} at column {e.colno}")
    if not isinstance(value, dict):
        return BadInput(where, "malformed_json",
                        f"expected a JSON object, got {type(value).__name__}")
    return Record(f"{src.name}:{line}", where, value)


def _read_json_array(src: Source, data: bytes) -> Iterator[Record | BadInput]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        yield BadInput(f"{src.path}:{_line_of(data, e.start)}", "undecodable",
                       f"undecodable bytes (invalid UTF-8 at byte {e.start})")
        return
    decoder = json.JSONDecoder()
    pos, line, counted = text.index("[") + 1, 1, 0
    items = []
    try:
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text) or text[pos] == "]":
                break
            line += text.count("\n", counted, pos)
            counted = pos
            value, pos = decoder.raw_decode(text, pos)
            items.append((line, value))
    except json.JSONDecodeError as e:
        yield BadInput(f"{src.path}:{e.lineno}", "malformed_json",
                       f"malformed JSON array: {e.msg} (the whole file is skipped)")
        return
    for index, (line, value) in enumerate(items, start=1):
        where = f"{src.path}:{line}"
        if isinstance(value, dict):  # named by index: one line may hold every element
            yield Record(f"{src.name}:{index}", where, value)
        else:
            yield BadInput(where, "malformed_json",
                           f"expected a JSON object, got {type(value).__name__}")


def _read_json(src: Source) -> Iterator[Record | BadInput]:
    with open(src.path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):
        with open(src.path, "rb") as f:
            yield from _read_json_array(src, f.read())
        return
    ds = _quiet_datasets().load_dataset("text", data_files=[src.path], split="train",
                                        streaming=True, encoding="latin-1")
    for i, row in enumerate(ds):
        item = _parse_json_line(row["text"], src, i + 1)
        if item is not None:
            yield item


def _read_table(src: Source) -> Iterator[Record | BadInput]:
    datasets = _quiet_datasets()
    try:
        if src.kind == "hf":
            loaded = datasets.load_from_disk(src.path)
            parts = ([(k, loaded[k]) for k in sorted(loaded)]
                     if isinstance(loaded, datasets.DatasetDict) else [("", loaded)])
        else:
            parts = [("", datasets.load_dataset(src.kind, data_files=[src.path],
                                                split="train", streaming=True))]
    except Exception as e:  # noqa: BLE001 -- any reader failure is bad input of this file
        yield BadInput(f"{src.path}:0", "unreadable_file",
                       f"cannot read {src.kind}: {str(e).splitlines()[0]}")
        return
    first = 2 if src.kind == "csv" else 1  # CSV: line 1 is the header
    for split, ds in parts:
        prefix = f"{src.name}/{split}" if split else src.name
        shown = f"{src.path}/{split}" if split else src.path
        try:
            for i, row in enumerate(ds):
                yield Record(f"{prefix}:{i + first}", f"{shown}:{i + first}", row)
        except Exception as e:  # noqa: BLE001 -- e.g. a CSV row with too many fields
            yield BadInput(f"{shown}:?", "unreadable_file", f"cannot read the rest of the file: "
                           f"{str(e).splitlines()[0]}")


_READERS = {"plain": _read_plain, "json": _read_json, "csv": _read_table,
            "parquet": _read_table, "hf": _read_table}


def read_sources(sources: list[Source], max_samples: int = 0) -> Iterator[Record | BadInput]:
    """Every record of `sources` in order; stops after `max_samples` good records."""
    n = 0
    for src in sources:
        for item in _READERS[src.kind](src):
            yield item
            if isinstance(item, Record):
                n += 1
                if max_samples and n >= max_samples:
                    return


def read_inputs(inputs, text_extensions=(".txt",), max_samples: int = 0):
    """`find_sources` + `read_sources`."""
    return read_sources(find_sources(tuple(inputs), tuple(text_extensions)), max_samples)


def text_of(record: Record, field: str) -> str:
    """The text of a pretraining record; raises KeyError/TypeError with a reason."""
    if isinstance(record.value, str):
        return record.value
    if field not in record.value or record.value[field] is None:
        raise KeyError(f"missing field {field!r} (--data.text_field)")
    text = record.value[field]
    if not isinstance(text, str):
        raise TypeError(f"field {field!r} is {type(text).__name__}, not text")
    return text
