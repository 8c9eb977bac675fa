"""`python -m ptuning.data fetch` against an HTTP server on 127.0.0.1 serving an archive built here from the LAMA
copy (the P-tuning layout, plus a file the runner never reads): a complete one, one cut mid-transfer that the
next fetch resumes, a corrupt one, one whose file differs from its checksum. No other network."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ptuning.data import fetch
from ptuning.data.__main__ import main
from ptuning.data.lama import find_layout, read_facts, select_relations


def build_archive(lama: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        tar.add(lama / "fact-retrieval", "LAMA/fact-retrieval")
        tar.add(lama / "relations.jsonl", "LAMA/relations.jsonl")
        for name in fetch.VOCABS:
            tar.add(lama / "vocab" / name, f"LAMA/{name}")
        extra = b'{"sub_label": "x", "obj_label": "y", "evidences": []}\n'  # a variant the runner never reads
        info = tarfile.TarInfo("LAMA/original_rob/P19/test.jsonl")
        info.size = len(extra)
        tar.addfile(info, io.BytesIO(extra))
    return buffer.getvalue()


def checksums_of(lama: Path, path: Path) -> Path:
    splits = {f"{p.parent.name}/{p.stem}": fetch.git_blob_id(p.read_bytes())
              for p in (lama / "fact-retrieval" / "original").glob("P*/*.jsonl")}
    vocab = {name: {"bytes": len((lama / "vocab" / name).read_bytes()),
                    "sha256": hashlib.sha256((lama / "vocab" / name).read_bytes()).hexdigest()}
             for name in fetch.VOCABS}
    path.write_text(json.dumps({"splits": splits, "vocab": vocab}))
    return path


class Archive(ThreadingHTTPServer):
    """Serves one file with HTTP Range support; `cut` stops the next transfer after that many bytes."""

    def __init__(self, data: bytes):
        super().__init__(("127.0.0.1", 0), Handler)
        self.data, self.cut, self.ranges = data, None, []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/P-tune_LAMA.tar.gz"


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        data, start = self.server.data, 0
        asked = self.headers.get("Range")
        self.server.ranges.append(asked)
        if asked:
            start = int(asked.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if self.server.cut is not None:
            body, self.server.cut = body[:self.server.cut], None
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


class Chunked(Handler):
    """No length announced: chunked transfer, cut in the middle of a chunk."""

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.write(b"100000\r\n" + self.server.data[:1000])
        self.close_connection = True


@pytest.fixture(scope="module")
def archive(lama) -> bytes:
    return build_archive(lama)


@pytest.fixture
def checksums(lama, tmp_path) -> Path:
    return checksums_of(lama, tmp_path / "checksums.json")


def test_fetch_downloads_unpacks_checks_and_places_the_data(archive, checksums, tmp_path, capsys):
    server = Archive(archive)
    dest = tmp_path / "lama"
    assert main(["fetch", "--dest", str(dest), "--url", server.url, "--checksums", str(checksums)]) == 0
    assert f"LAMA ready in {dest}" in capsys.readouterr().out
    layout = find_layout(dest)
    relations = select_relations(layout, None)
    assert len(relations) == 41 and sum(len(read_facts(layout, r, "test")) for r in relations) == 34_039
    assert not (dest / "original_rob").exists()  # only what the runner reads
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checksums.json", "lama"]  # no download or staging left
    assert main(["fetch", "--dest", str(dest), "--url", server.url, "--checksums", str(checksums)]) == 0
    assert "already complete" in capsys.readouterr().err and len(server.ranges) == 1  # checked, not downloaded


def test_a_transfer_cut_midway_resumes_where_it_stopped(archive, checksums, tmp_path, capsys):
    server = Archive(archive)
    server.cut = 1 << 20
    dest = tmp_path / "lama"
    assert main(["fetch", "--dest", str(dest), "--url", server.url, "--checksums", str(checksums)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "stopped at 1,048,576 of" in error and "run the same command" in error
    assert not dest.exists()  # a partial download never looks like a data set
    assert main(["fetch", "--dest", str(dest), "--url", server.url, "--checksums", str(checksums)]) == 0
    assert server.ranges == [None, "bytes=1048576-"]
    assert len(select_relations(find_layout(dest), None)) == 41


def test_a_corrupt_archive_is_refused_and_deleted(archive, checksums, tmp_path, capsys):
    broken = bytearray(archive)
    broken[len(broken) // 2:len(broken) // 2 + 4096] = bytes(4096)
    server = Archive(bytes(broken))
    dest = tmp_path / "lama"
    assert main(["fetch", "--dest", str(dest), "--url", server.url, "--checksums", str(checksums)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "corrupt or truncated archive" in error and "deleted it" in error
    assert not dest.exists() and not (tmp_path / "lama.download" / fetch.ARCHIVE).exists()
    assert not (tmp_path / "lama.staging").exists()


def test_a_file_that_differs_from_its_checksum_is_refused_by_name(archive, checksums, tmp_path, capsys):
    table = json.loads(checksums.read_text())
    table["splits"]["P36/test"] = "0" * 40
    checksums.write_text(json.dumps(table))
    server = Archive(archive)
    dest = tmp_path / "lama"
    assert main(["fetch", "--dest", str(dest), "--url", server.url, "--checksums", str(checksums)]) == 2
    error = capsys.readouterr().err
    assert "P36/test.jsonl: git blob id" in error and "expected 0000000000" in error and not dest.exists()
    assert main(["fetch", "--dest", str(dest), "--url", server.url, "--skip-checksums"]) == 0  # counts still checked


def test_no_server_is_one_line(tmp_path, capsys):
    assert main(["fetch", "--dest", str(tmp_path / "lama"), "--url", "http://127.0.0.1:9/none.tar.gz"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: http://127.0.0.1:9/none.tar.gz: cannot connect") and error.count("\n") == 1


def test_the_shipped_checksums_cover_every_split_file(lama):
    table = json.loads(fetch.CHECKSUMS.read_text())
    files = {f"{p.parent.name}/{p.stem}" for p in (lama / "fact-retrieval" / "original").glob("P*/*.jsonl")}
    assert set(table["splits"]) == files and len(files) == 123
    assert set(table["vocab"]) == set(fetch.VOCABS)


def test_a_chunked_transfer_cut_midway_is_one_line(archive, tmp_path, capsys):
    server = Archive(archive)
    server.RequestHandlerClass = Chunked
    assert main(["fetch", "--dest", str(tmp_path / "lama"), "--url", server.url, "--skip-checksums"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "the transfer stopped after 0 bytes (IncompleteRead)" in error, error
