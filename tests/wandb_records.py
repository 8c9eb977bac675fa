"""Read an offline W&B run back from its .wandb file (wandb 0.31 ships no Python reader for it).

The file is a LevelDB-style log: a 7-byte header (':W&B', magic, version), then 32 KiB blocks of records, each
with a 7-byte header (crc32c, little-endian length, type: 1 full, 2 first, 3 middle, 4 last) around a protobuf
wandb Record.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pending, pos = [], [], 7
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            break
        pending.append(payload)
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pending))
            out.append(record)
            pending = []
    return out


def read_run(out_dir: Path, file: Path | None = None) -> dict:
    """A run's identity, config, summary, and logged history keys (with the last value of each): the given run
    file, or the folder's latest."""
    files = sorted((out_dir / "wandb").glob("wandb/offline-run-*/run-*.wandb"))
    assert files, f"no offline W&B run under {out_dir / 'wandb'}"
    run = {"summary": {}, "history": {}, "config": {}, "files": files}
    for record in records(file or files[-1]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(group=record.run.run_group, job_type=record.run.job_type, run_id=record.run.run_id,
                       name=record.run.display_name)
            for item in record.run.config.update:
                _put(run["config"], item)
        elif kind == "summary":
            for item in record.summary.update:
                _put(run["summary"], item)
        elif kind == "history":
            for item in record.history.item:
                _put(run["history"], item)
    return run


def _put(target: dict, item) -> None:
    """Items name their key in `key`, or as a path in `nested_key` (a table's fields, say)."""
    path = [item.key] if item.key else list(item.nested_key)
    for part in path[:-1]:
        target = target.setdefault(part, {})
    target[path[-1]] = json.loads(item.value_json)
