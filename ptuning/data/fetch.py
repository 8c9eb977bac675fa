"""The full LAMA in one command: the P-tuning archive downloaded (resumable), only what the runner reads unpacked,
checked, and only then put in place.

    python -m ptuning.data fetch [--dest data/lama] [--url URL] [--skip-checksums]        (make data)

- The download goes to <dest>.download/P-tune_LAMA.tar.gz.part and resumes from there (an HTTP Range request)
  when a transfer was cut; it is renamed once every byte the server announced has arrived.
- Unpacked into <dest>.staging: the 123 split files, the relation templates and the two vocabulary files, from
  whichever folder of the archive holds fact-retrieval/ (evidence sentences and other variants are left out).
- Checked: 41 relations; 29,029 train, 7,255 dev and 34,039 test records; the vocabulary files' sizes and
  SHA-256; each split file's git blob id against data/lama_checksums.json (the ids of the P-tuning packing's
  files as published in GitHub copies of it; the archive itself could not be reached from where this was
  written, so a mismatch names both ids and --skip-checksums goes on with every other check).
- Renamed to <dest> only when every check passed: a partial download or a failed check never looks like a data
  set. Every failure (no network, a cut or corrupt archive, a full disk) is one line; the same command resumes.
"""
from __future__ import annotations

import errno
import gzip
import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import zlib
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from ptuning.files import DataError

ARCHIVE_URL = "https://zenodo.org/records/5578210/files/P-tune_LAMA.tar.gz?download=1"
ARCHIVE = "P-tune_LAMA.tar.gz"
REPO = Path(__file__).resolve().parents[2]
CHECKSUMS = REPO / "data" / "lama_checksums.json"
DEFAULT_DEST = REPO / "data" / "lama"
EXPECTED_RECORDS = {"train": 29_029, "dev": 7_255, "test": 34_039}
EXPECTED_RELATIONS = 41
VOCABS = ("29k-vocab.json", "34k-vocab.json")


class FetchError(DataError):
    """A fetch that cannot finish; the message says what happened and what to do."""


def git_blob_id(data: bytes) -> str:
    """The id git gives a file's bytes (how the GitHub copies name each split file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def fetch(dest: Path = DEFAULT_DEST, url: str = ARCHIVE_URL, checksums: Path | None = CHECKSUMS,
          show_progress: bool = True) -> Path:
    """Download, unpack, check and place the LAMA data at `dest`; returns dest. Raises FetchError."""
    dest = Path(dest)
    if (dest / "fact-retrieval" / "original").is_dir():
        check(dest, _load(checksums))
        print(f"already complete: {dest}", file=sys.stderr)
        return dest
    if dest.exists():
        raise FetchError(f"{dest}: exists and is not a LAMA folder; remove it or choose another --dest")
    expected = _load(checksums)  # a bad checksum file stops before the download
    archive = download(url, dest.parent / f"{dest.name}.download" / ARCHIVE, show_progress)
    staging = dest.parent / f"{dest.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        unpack(archive, staging)
        check(staging, expected)
        os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(archive.parent, ignore_errors=True)  # the archive holds evidences we never read: ~GBs
    return dest


def _load(path: Path | None) -> dict | None:
    if path is None:
        return None
    from ptuning.files import read_json

    table = read_json(path)
    if not isinstance(table, dict) or not isinstance(table.get("splits"), dict):
        raise FetchError(f"{path}: expected an object with 'splits' (git blob id by 'P<id>/<split>')")
    return table


def _disk(error: OSError, path: Path, what: str) -> FetchError:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return FetchError(f"{path}: no space left on the device while {what}; free some and run the same command "
                          "(the download resumes where it stopped)")
    return FetchError(f"{path}: {error.strerror or error} while {what}")


def download(url: str, part: Path, show_progress: bool = True) -> Path:
    """The archive at `url` in part's folder, resuming `part` where an earlier transfer stopped."""
    done = part.with_suffix("")  # .tar.gz.part -> .tar.gz
    if done.is_file():
        return done
    try:
        part.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _disk(error, part.parent, "making the download folder") from None
    have = part.stat().st_size if part.is_file() else 0
    request = Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urlopen(request, timeout=60)
    except HTTPError as error:
        if error.code == 416 and have:  # asked past the end: the part is the whole file
            os.replace(part, done)
            return done
        raise FetchError(f"{url}: the server answered {error.code} {error.reason}") from None
    except (URLError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        raise FetchError(f"{url}: cannot connect ({reason}); check the network and run the same command") from None
    with response:
        if have and response.status != 206:  # the server ignored the range: start over
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        bar = _bar(total, have, show_progress)
        try:
            with open(part, "ab" if have else "wb") as out:
                while True:
                    try:
                        chunk = response.read(1 << 20)
                    except (OSError, ValueError, http.client.HTTPException) as error:  # reset, timeout, cut
                        where = f"at {out.tell():,} of {total:,}" if total else f"after {out.tell():,}"
                        raise FetchError(f"{url}: the transfer stopped {where} bytes ({type(error).__name__}); run "
                                         "the same command to resume") from None
                    if not chunk:
                        break
                    out.write(chunk)
                    bar.update(len(chunk))
        except OSError as error:
            raise _disk(error, part, "downloading") from None
        finally:
            bar.close()
    size = part.stat().st_size
    if total is not None and size != total:
        raise FetchError(f"{url}: the transfer stopped at {size:,} of {total:,} bytes; run the same command to "
                         "resume")
    os.replace(part, done)
    return done


def _bar(total: int | None, initial: int, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, desc="P-tune_LAMA.tar.gz",
                disable=not show or not sys.stderr.isatty())  # a log gets no carriage-return bar


def _wanted(relative: str) -> bool:
    parts = relative.split("/")
    if parts[:2] == ["fact-retrieval", "original"]:
        return len(parts) == 4 and parts[2].startswith("P") and parts[3] in ("train.jsonl", "dev.jsonl",
                                                                               "test.jsonl")
    if parts[0] == "single_relations":
        return len(parts) == 2 and parts[1].endswith(".jsonl")
    return relative in ("relations.jsonl", *VOCABS, *(f"vocab/{v}" for v in VOCABS))


def unpack(archive: Path, staging: Path) -> None:
    """What the runner reads, from the archive folder that holds fact-retrieval/ (a corrupt archive is deleted,
    so that the next fetch downloads it again)."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            roots = {m.name.split("fact-retrieval/")[0] for m in members if "fact-retrieval/original/" in m.name}
            if len(roots) != 1:
                raise FetchError(f"{archive}: not the P-tuning LAMA archive (no single folder holding "
                                 "fact-retrieval/original/); delete it and check --url")
            root = roots.pop()
            for member in members:
                if not member.isfile() or not member.name.startswith(root):
                    continue
                relative = member.name[len(root):]
                if not _wanted(relative):
                    continue
                target = staging / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
            # tarfile stops quietly at a damaged header; reading the compressed stream to its end checks its CRC
            while tar.fileobj.read(1 << 20):
                pass
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        archive.unlink(missing_ok=True)
        raise FetchError(f"{archive}: corrupt or truncated archive ({error}); deleted it: run the same command to "
                         "download it again") from None
    except OSError as error:
        raise _disk(error, staging, "unpacking") from None


def check(root: Path, expected: dict | None) -> None:
    """41 relations, the record counts, the templates, the vocabulary files, and each split file's blob id."""
    facts = root / "fact-retrieval" / "original"
    relations = sorted(p.name for p in facts.iterdir() if p.is_dir()) if facts.is_dir() else []
    if len(relations) != EXPECTED_RELATIONS:
        raise FetchError(f"{facts}: {len(relations)} relation folders, expected {EXPECTED_RELATIONS}")
    counts = dict.fromkeys(EXPECTED_RECORDS, 0)
    for relation in relations:
        for split in EXPECTED_RECORDS:
            path = facts / relation / f"{split}.jsonl"
            if not path.is_file():
                raise FetchError(f"{path}: missing")
            data = path.read_bytes()
            counts[split] += sum(1 for line in data.splitlines() if line.strip())
            known = (expected or {}).get("splits", {}).get(f"{relation}/{split}")
            if known is not None and git_blob_id(data) != known:
                raise FetchError(f"{path}: git blob id {git_blob_id(data)}, expected {known} (data/lama_checksums"
                                 ".json); --skip-checksums goes on with the record counts checked")
    for split, n in EXPECTED_RECORDS.items():
        if counts[split] != n:
            raise FetchError(f"{facts}: {counts[split]:,} {split} records, expected {n:,}")
    if not (root / "relations.jsonl").is_file() and not any((root / "single_relations").glob("P*.jsonl")):
        raise FetchError(f"{root}: no relation templates (relations.jsonl or single_relations/)")
    for name in VOCABS:
        path = next((p for p in (root / name, root / "vocab" / name) if p.is_file()), None)
        if path is None:
            raise FetchError(f"{root}: no {name}")
        known = (expected or {}).get("vocab", {}).get(name)
        if known is not None:
            data = path.read_bytes()
            if len(data) != known["bytes"] or hashlib.sha256(data).hexdigest() != known["sha256"]:
                raise FetchError(f"{path}: {len(data):,} bytes, SHA-256 {hashlib.sha256(data).hexdigest()[:16]}..., "
                                 f"expected {known['bytes']:,} bytes, {known['sha256'][:16]}...")

