"""A private one-node SLURM cluster for the tests: munged, slurmctld and slurmd started by hand (no systemd here)
with a generated slurm.conf, their own ports and state in a temporary folder. Debian's slurmctld, slurmd,
slurm-client and munge must be installed (.ci/run installs them when it runs as root)."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol")
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
MUNGE_KEY = Path("/etc/munge/munge.key")


def missing() -> str | None:
    """Why no cluster can be started here, or None."""
    absent = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if absent:
        return f"SLURM/munge not installed ({', '.join(absent)}): apt-get install slurmctld slurmd slurm-client munge"
    if os.geteuid() != 0:
        return "the test cluster runs its daemons as root"
    if not MUNGE_KEY.is_file():
        return f"{MUNGE_KEY} missing (the munge package creates it)"
    return None


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        host = socket.gethostname().split(".")[0]
        for sub in ("state", "spool", "munge"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.socket = root / "munge" / "munge.sock"
        self.conf = root / "slurm.conf"
        self.conf.write_text("\n".join([
            "ClusterName=ptuningtest", f"SlurmctldHost={host}", "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", f"AuthInfo=socket={self.socket}", "CredType=cred/munge",
            f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
            f"SlurmctldPort={_port()}", f"SlurmdPort={_port()}", "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none", "SchedulerType=sched/builtin", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "ReturnToService=2", "MpiDefault=none",
            f"SlurmctldLogFile={root / 'slurmctld.log'}", f"SlurmdLogFile={root / 'slurmd.log'}",
            "JobCompType=jobcomp/none", "AccountingStorageType=accounting_storage/none",
            f"NodeName={host} CPUs={os.cpu_count()} RealMemory=4000 State=UNKNOWN",
            f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> None:
        m = self.root / "munge"
        subprocess.run([_sbin("munged"), "--force", f"--socket={self.socket}", f"--key-file={MUNGE_KEY}",
                        f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}",
                        f"--seed-file={m / 'seed'}"], check=True)
        subprocess.run([_sbin("slurmctld"), "-f", str(self.conf)], check=True, env=self.env)
        subprocess.run([_sbin("slurmd"), "-f", str(self.conf)], check=True, env=self.env)
        deadline = time.time() + 60
        while time.time() < deadline:
            state = self.run("sinfo", "-h", "-o", "%T").stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"the test SLURM node never became idle; see {self.root}/slurm*.log")

    def stop(self) -> None:
        self.run("scontrol", "shutdown")
        pid_file = self.root / "munge" / "munged.pid"
        time.sleep(1)
        if pid_file.is_file():
            subprocess.run(["kill", pid_file.read_text().strip()])

    def run(self, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(command), capture_output=True, text=True, env=self.env)

    def wait(self, job: str, timeout: float = 300, release_requeued: bool = False) -> None:
        """Until the job has ended (scontrol keeps an ended job for MinJobAge). release_requeued: the job is being
        requeued; start it again soon rather than after the delay SLURM puts on it, and wait for the run after the
        requeue to end (between the two, the queue can show no job for a moment)."""
        deadline = time.time() + timeout
        requeued_at = None  # when the job was first seen pending again after its first run
        while time.time() < deadline:
            info = self.run("scontrol", "show", "job", job).stdout
            state = re.search(r"JobState=(\S+)", info)
            if state is None:  # gone from the controller's memory: ended long ago, or being requeued this moment
                if not release_requeued:
                    return
                time.sleep(0.5)
                continue
            if release_requeued and state[1] == "PENDING" and "Reason=BeginTime" in info:
                requeued_at = requeued_at or time.time()
                # slurmd refuses a launch whose credential dates from the second the first run was killed in
                # ("already killed, do not launch batch job": the rerun FAILED at once under CI's load); SLURM's
                # own requeue delay is there for this. Two seconds and an idle node are enough.
                if time.time() - requeued_at >= 2 and self.run("sinfo", "-h", "-o", "%T").stdout.strip() == "idle":
                    self.run("scontrol", "update", f"JobId={job}", "StartTime=now")
            # a requeued job's first run ends CANCELLED before the job is pending again: not the end waited for
            first_runs_end = release_requeued and requeued_at is None and state[1] == "CANCELLED"
            if state[1] in ENDED and not first_runs_end:
                return
            time.sleep(0.5)
        raise TimeoutError(f"SLURM job {job} still queued after {timeout} s")
