"""Parsing dataset files (JSONL, JSON, CSV, Parquet) into rows numbered by their place in the source."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from kubetune_trainer.data.rows import DataError, RowErrors

# A row longer than this is refused before anything parses it: far beyond what any maxLength trains on, and decoding,
# parsing and tokenizing one line of hundreds of MB takes gigabytes of memory before anything fails.
MAX_ROW_BYTES = 8 * 2**20
LINE_FILE_TYPES = frozenset({"jsonl", "csv"})

FILE_TYPES: dict[str, str] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


@dataclass(frozen=True)
class SourceRow:
    """One row of a dataset file: its 1-based line (JSONL, CSV) or row number (JSON, Parquet) and its columns."""

    line: int
    values: dict[str, Any]


def file_type(file_name: str) -> str:
    """jsonl, json, csv or parquet from the file name's extension; DataError for anything else."""
    suffix = PurePosixPath(file_name).suffix.lower()
    if suffix not in FILE_TYPES:
        expected = ", ".join(sorted(FILE_TYPES))
        raise DataError(
            f"{file_name}: unsupported file type {suffix or '(no extension)'!r}; expected one of {expected}"
        )
    return FILE_TYPES[suffix]


def first_oversized_line(data: bytes, limit: int = MAX_ROW_BYTES) -> tuple[int, int] | None:
    """(1-based line, its length in bytes) of the first line longer than `limit`; None when every line fits."""
    start, line = 0, 1
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end == -1 else end
        if end - start > limit:
            return line, end - start
        start, line = end + 1, line + 1
    return None


def read_rows(data: bytes, file_name: str, max_row_bytes: int = MAX_ROW_BYTES) -> list[SourceRow]:
    """Parse a dataset file by its extension; malformed rows are reported together as FILE:LINE: reason. A line of a
    JSONL or CSV file longer than `max_row_bytes` is refused first, naming its line."""
    kind = file_type(file_name)
    oversized = first_oversized_line(data, max_row_bytes) if kind in LINE_FILE_TYPES else None
    if oversized:
        line, size = oversized
        raise DataError(
            f"{file_name}:{line}: a row of {size:,} bytes, more than the {max_row_bytes:,} a row may have "
            "(one record per line?)"
        )
    if kind == "parquet":
        rows = _parquet_rows(data, file_name)
    else:
        text = _decode(data, file_name)
        if kind == "jsonl":
            rows = _jsonl_rows(text, file_name)
        elif kind == "json":
            rows = _json_rows(text, file_name)
        else:
            rows = _csv_rows(text, file_name)
    if not rows:
        raise DataError(f"{file_name} has no rows")
    return rows


def column_names(rows: list[SourceRow]) -> list[str]:
    """Every column that appears in any row, in order of first appearance."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row.values))
    return list(names)


def _decode(data: bytes, file_name: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataError(f"{file_name}:{line}: not UTF-8 text (bad byte at offset {error.start})") from None


def _jsonl_rows(text: str, file_name: str) -> list[SourceRow]:
    rows: list[SourceRow] = []
    errors = RowErrors()
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            errors.add(file_name, number, f"malformed JSON: {error.msg} (column {error.colno})")
            continue
        if not isinstance(value, dict):
            errors.add(file_name, number, f"expected a JSON object, got {_json_type(value)}")
            continue
        rows.append(SourceRow(number, value))
    errors.raise_if_any()
    return rows


def _json_rows(text: str, file_name: str) -> list[SourceRow]:
    if not text.strip():
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{file_name}:{error.lineno}: malformed JSON: {error.msg} (column {error.colno})") from None
    if not isinstance(value, list):
        raise DataError(f"{file_name}: expected a JSON list of objects, got {_json_type(value)}")
    errors = RowErrors()
    rows: list[SourceRow] = []
    for number, item in enumerate(value, start=1):
        if isinstance(item, dict):
            rows.append(SourceRow(number, item))
        else:
            errors.add(file_name, number, f"expected a JSON object, got {_json_type(item)}")
    errors.raise_if_any()
    return rows


def _csv_rows(text: str, file_name: str) -> list[SourceRow]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None or not any(name.strip() for name in header):
            return []
        duplicates = sorted({name for name in header if header.count(name) > 1})
        if duplicates:
            raise DataError(f"{file_name}:1: duplicate column names in the header: {', '.join(duplicates)}")
        errors = RowErrors()
        rows: list[SourceRow] = []
        # A quoted field may span lines, so a record starts on the line after the previous record ended.
        next_line = reader.line_num + 1
        for record in reader:
            line, next_line = next_line, reader.line_num + 1
            if not record:
                continue
            if len(record) != len(header):
                errors.add(file_name, line, f"has {len(record)} fields, the header has {len(header)}")
                continue
            rows.append(SourceRow(line, dict(zip(header, record, strict=True))))
    except csv.Error as error:
        raise DataError(f"{file_name}:{reader.line_num}: malformed CSV: {error}") from None
    errors.raise_if_any()
    return rows


def _parquet_rows(data: bytes, file_name: str) -> list[SourceRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{file_name} is not a readable Parquet file: {error}") from None
    return [SourceRow(number, values) for number, values in enumerate(table.to_pylist(), start=1)]


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
