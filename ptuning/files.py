"""Reading the files a run is given: text that must be UTF-8, JSON, JSON lines. Every problem is a DataError whose
one-line message names the file and, for text, the line: never a traceback from a decoder."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A missing or malformed input file (LAMA data, a vocabulary, a saved record, a checkpoint). The message names
    the file, and the line and field where there are lines."""


def read_bytes(path: str | Path) -> bytes:
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read it ({error.strerror})") from None


def read_text(path: str | Path) -> str:
    """The file as UTF-8 text; other bytes are an error naming the line and column where they start."""
    data = read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise DataError(f"{path}, line {line}: not UTF-8 text (byte 0x{data[error.start]:02x} at column "
                        f"{column})") from None


def parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}, line {error.lineno}: not valid JSON ({error.msg})") from None


def read_json(path: str | Path) -> Any:
    return parse_json(read_text(path), str(path))


def read_json_object(path: str | Path, what: str = "a JSON object") -> dict:
    value = read_json(path)
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected {what}, got a JSON {type(value).__name__}")
    return value


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-empty line."""
    records = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object, got a JSON {type(record).__name__}")
        records.append((number, record))
    return records


def one_line(error: Exception) -> str:
    """A multi-line error (load_state_dict lists every mismatch) as its first specific line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    specific = [line for line in lines[1:] if not line.endswith(":")]
    return (specific[0] + (f" (and {len(specific) - 1} more)" if len(specific) > 1 else "")) if specific else \
        (lines[0] if lines else type(error).__name__)
