"""Reading and writing files. Reading: text that must be UTF-8, JSON, JSON lines; every problem is a DataError whose
one-line message names the file and, for text, the line: never a traceback from a decoder. Writing: whole files
only (a temporary file beside the target, synced, renamed, the folder synced), with the mode the umask gives;
what the machine refuses (a full disk, a quota, a read-only file system, a permission) is a WriteError naming the
path, the cause and what is safe."""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch


class DataError(ValueError):
    """A missing or malformed input file (LAMA data, a vocabulary, a saved record, a checkpoint). The message names
    the file, and the line and field where there are lines."""


class WriteError(DataError):
    """The machine would not take a file (full disk, quota, read-only, permission): one line, exit status 2."""


CAUSES = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
          errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
          errno.ENOTDIR: "a part of the path is a file, not a folder"}
SAFE = ("every file here is written whole or not at all, so what is on disk stays readable; finished units are "
        "kept and the same command resumes")


def cause_of(error: OSError) -> str:
    return CAUSES.get(error.errno, error.strerror or type(error).__name__)


def write_error(error: OSError, path: str | Path) -> WriteError:
    """The one line for an OSError met while writing `path`."""
    return WriteError(f"{path}: {cause_of(error)}; {SAFE}")


def _umask_at_import() -> int:
    mask = os.umask(0o022)  # set and restore: only while the process has one thread
    os.umask(mask)
    return mask


_IMPORT_UMASK = _umask_at_import()


def file_mode() -> int:
    """What open() would give a new file now: 0o666 less the umask (0644 under the usual 022), so that a group
    sharing the output folder can read the results. The umask is read from /proc where there is one (os.umask
    sets while it reads: not for a process with threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    return 0o666 & ~_IMPORT_UMASK


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


def _sync_folder(folder: Path) -> None:
    """A rename is durable once its folder is synced (a power loss could otherwise roll the rename back)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_folder(path: str | Path) -> None:
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise WriteError(f"{path}: exists and is not a folder") from None
    except OSError as error:
        raise write_error(error, path) from None


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """write(handle) fills a temporary file beside path, which is synced, given the umask's mode and renamed over
    path; then the folder is synced. A failure leaves the old file (or none) and no temporary file."""
    path = Path(path)
    make_folder(path.parent)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.fchmod(fd, file_mode())  # mkstemp makes 0600 whatever the umask
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
        _sync_folder(path.parent)
    except OSError as error:
        raise write_error(error, path) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save as save_safetensors

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save_safetensors(cpu, metadata=metadata))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as load_safetensors

    return load_safetensors(Path(path).read_bytes())

