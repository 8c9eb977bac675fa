"""Processes for the tests, forked from one warm process instead of started cold.

A rank started by torchrun is a fresh interpreter that imports torch, transformers and megatron-core before it
does anything: 3-6 s of CPU each, most of the suite's time on two cores. Here one server process imports those
once (and runs no torch op, so no thread pool exists to break a fork), then forks each process a test asks for:
ranks with torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and
real gloo process groups, or a plain process without it. Each runs a script as __main__ with its arguments, its
output in files of its own, in the server's environment (as it was when the server started) plus its job's, with
its own thread count (OMP_NUM_THREADS, default 1). As torchrun does, when one rank fails the others are stopped;
when the server dies, its processes die too. Jobs run side by side: `start` hands one to the server and returns at
once, `wait` collects it (two independent runs of one test share the two cores instead of taking turns).

Tests whose subject is a launcher (torchrun, the deepspeed launcher, SLURM, signals that a launcher forwards)
start that launcher; the others use this.

    run = spawn(2, "launcher/run.py", "--config", ...)       # ranks; spawn(0, ...) for one plain process
    run.returncode, run.stdout, run.stderr, run.rank_stderr  # like subprocess.CompletedProcess
    job = start(0, ...); ...; run = job.wait()              # the same, while the test goes on
"""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WARM = ("torch", "torch.distributed", "transformers", "safetensors.torch", "megatron.core.tensor_parallel",
        "megatron.core.parallel_state", "ptuning.experiment", "ptuning.model.loading", "ptuning.compare",
        "ptuning.model.megatron_backbone", "model_parallel.merge", "launcher.run", "launcher.distributed", "wandb",
        "deepspeed", "matplotlib.pyplot")


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str  # every process's, in rank order
    rank_stderr: list[str]
    codes: list[int]
    timed_out: bool = False


# ---- the server: runs as `python tests/ranks.py` ---------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(job: dict, rank: int, port: int, out: str, err: str) -> None:
    """In the forked process: the environment, the working folder, the output files, then the script."""
    import runpy
    import traceback

    code = 1
    try:
        os.setpgid(0, 0)  # a group of its own: a test can signal it and whatever it starts
        _die_with_parent()
        os.environ.update(job["env"])
        if job["nproc"]:
            n = job["nproc"]
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        os.chdir(job["cwd"])
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                (2, err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            handle = os.open(path, flags, 0o644)  # stdin: not the server's job pipe
            os.dup2(handle, fd)
            os.close(handle)
        sys.stdout.reconfigure(line_buffering=True)  # what a killed rank printed is in its file
        import torch

        # the thread pools read OMP_NUM_THREADS when torch loaded, in the server: set this process's own count
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))
        sys.argv = list(job["argv"])
        if job["module"]:
            runpy.run_module(job["argv"][0], run_name="__main__", alter_sys=True)
        else:
            sys.path.insert(0, str(Path(job["argv"][0]).resolve().parent))
            runpy.run_path(job["argv"][0], run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)  # as the interpreter does with sys.exit("message")
    except BaseException:  # noqa: BLE001 - reported in the process's stderr, as an interpreter would
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _die_with_parent() -> None:
    """A rank whose server dies (Ctrl-C in pytest, a killed server) is killed too, not left hanging in gloo."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _run(job: dict) -> dict:
    n = max(job["nproc"], 1)
    port = _free_port()
    folder = tempfile.mkdtemp(prefix="ranks-")
    files = [(f"{folder}/{r}.out", f"{folder}/{r}.err") for r in range(n)]
    pids = []
    for rank in range(n):
        pid = os.fork()
        if pid == 0:
            _child(job, rank, port, *files[rank])
        pids.append(pid)
    codes: dict[int, int] = {}
    deadline = time.time() + job["timeout"]
    failed_at = None
    while len(codes) < n:
        for rank, pid in enumerate(pids):
            if rank in codes:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[rank] = os.waitstatus_to_exitcode(status)
                if codes[rank] != 0 and failed_at is None:
                    failed_at = time.time()
        # like torchrun: one rank's failure stops the others (after a moment to write what they were doing)
        if time.time() > deadline or (failed_at is not None and time.time() > failed_at + 10):
            for rank, pid in enumerate(pids):
                if rank not in codes:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except OSError:  # not yet in a group of its own
                        os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)
    outputs = []
    for out, err in files:
        outputs.append([Path(out).read_text(errors="replace"), Path(err).read_text(errors="replace")])
        os.unlink(out)
        os.unlink(err)
    os.rmdir(folder)
    return {"codes": [codes[r] for r in range(n)], "outputs": outputs, "timed_out": time.time() > deadline}


def _supervise(job: dict, answers: int) -> None:
    """In a process forked per job: run it, write the answer to the job's file, then announce the job's id on the
    answer pipe (one short line: a single write, whole even when jobs end at once)."""
    import traceback

    try:
        _die_with_parent()
        try:
            answer = _run(job)
        except BaseException:  # noqa: BLE001 - the test shows it as the job's output
            answer = {"codes": [1], "outputs": [["", traceback.format_exc()]], "timed_out": False}
        Path(job["answer"]).write_text(json.dumps(answer))
        os.write(answers, f"{job['id']}\n".encode())
    finally:
        os._exit(0)


def serve() -> None:
    answers = os.dup(1)  # the protocol's channel; whatever an import prints goes to stderr
    os.dup2(2, 1)
    for name in WARM:
        __import__(name)
    if threading.active_count() != 1:  # a thread at fork time would leave its locks held in every child
        raise RuntimeError(f"the rank server has {threading.active_count()} threads after its imports")
    os.write(answers, b"ready\n")
    for line in sys.stdin:
        if os.fork() == 0:
            _supervise(json.loads(line), answers)
        while True:  # reap the supervisors that have ended
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break


# ---- the client, in the test process ----------------------------------------------------------------------------
_server: subprocess.Popen | None = None
_ended: set[str] = set()  # jobs the server announced that no one has collected yet
_unread = b""  # what the server wrote that is not a whole line yet


def _read_line(server: subprocess.Popen, deadline: float) -> str | None:
    """The server's next line, or None at the deadline. Read from the pipe itself: a buffered reader could hold a
    second announcement that select() on the pipe would then never see."""
    global _unread
    while b"\n" not in _unread:
        ready, _, _ = select.select([server.stdout], [], [], max(deadline - time.time(), 0))
        if not ready:
            return None
        chunk = os.read(server.stdout.fileno(), 4096)
        if not chunk:
            return ""
        _unread += chunk
    line, _unread = _unread.split(b"\n", 1)
    return line.decode()


def _connect() -> subprocess.Popen:
    global _server, _unread
    if _server is None or _server.poll() is not None:
        _unread = b""
        # the server imports warm with one thread; the ranks it forks read OMP_NUM_THREADS from their job
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1"}  # the server's own imports; each process sets its count from its job
        log = tempfile.TemporaryFile(mode="w+")  # the server's own warnings; shown if it does not start
        _server = subprocess.Popen([sys.executable, str(Path(__file__).resolve())], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=REPO)
        if _read_line(_server, time.time() + 300) != "ready":
            log.seek(0)
            raise RuntimeError(f"the rank server did not start: {log.read()[-3000:]}")
    return _server


class Job:
    """A job the server runs while the test goes on; wait() gives what spawn() gives."""

    def __init__(self, nproc: int, argv: tuple, env: dict | None, cwd: Path, timeout: float, module: bool):
        self.server, self.argv, self.timeout = _connect(), argv, timeout
        handle, self.answer = tempfile.mkstemp(prefix="ranks-answer-")
        os.close(handle)
        self.id = Path(self.answer).name
        job = {"id": self.id, "answer": self.answer, "nproc": nproc, "argv": [str(a) for a in argv],
               "cwd": str(cwd), "timeout": timeout, "module": module,
               "env": {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}}
        self.server.stdin.write(json.dumps(job) + "\n")
        self.server.stdin.flush()
        self.done: Finished | None = None

    def wait(self, check: bool = True) -> Finished:
        """check: a process that fails fails the test, with its output. A second call gives the same."""
        if self.done is None:
            self.done = self._collect()
        done = self.done
        if check:
            assert done.returncode == 0 and not done.timed_out, (
                f"{self.argv}: exit codes {done.codes}{' (timed out)' if done.timed_out else ''}\n"
                + done.stdout[-2000:] + done.stderr[-4000:])
        return done

    def _collect(self) -> Finished:
        deadline = time.time() + self.timeout + 60
        while self.id not in _ended:
            line = _read_line(self.server, deadline)
            if line is None:
                self.server.kill()
                raise TimeoutError(f"{self.argv}: no answer from the rank server in {self.timeout + 60} s")
            if not line:
                raise RuntimeError(f"{self.argv}: the rank server ended before the job did")
            _ended.add(line)
        _ended.discard(self.id)
        answer = json.loads(Path(self.answer).read_text())
        os.unlink(self.answer)
        outputs = answer["outputs"]
        code = next((c for c in answer["codes"] if c != 0), 0)
        return Finished(code, "".join(o for o, _ in outputs), "".join(e for _, e in outputs),
                        [e for _, e in outputs], answer["codes"], answer["timed_out"])


def start(nproc: int, *argv: str, env: dict | None = None, cwd: Path = REPO, timeout: float = 600,
          module: bool = False) -> Job:
    """Run a script (or with module=True, `python -m argv[0]`) as `nproc` torchrun-style ranks, or as one plain
    process when nproc is 0; returns at once."""
    return Job(nproc, argv, env, cwd, timeout, module)


def spawn(nproc: int, *argv: str, env: dict | None = None, cwd: Path = REPO, timeout: float = 600,
          module: bool = False, check: bool = True) -> Finished:
    """start(...).wait(check): the job, run to its end."""
    return start(nproc, *argv, env=env, cwd=cwd, timeout=timeout, module=module).wait(check)


if __name__ == "__main__":
    serve()
