"""A real two-node Ray cluster on this machine: two `ray start` processes, token auth on.

Each node runs in its own process group, started here and ended here by its id (never
`ray stop`, which would stop every Ray on the machine). Every port is picked free, so
clusters of other processes on the machine are not disturbed.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import closing, suppress
from pathlib import Path

__all__ = ["RayCluster"]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _ray_cli() -> str:
    found = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if found is None:
        raise RuntimeError("the `ray` command is not installed")
    return found


class RayCluster:
    """Head and worker node, one CPU each, custom resources ``node_head`` / ``node_worker``
    (so a test can place work on a node). ``env``: what a driver needs (address, token).
    ``cores``: node name -> the CPUs its processes may run on (the raylet, agents and workers
    inherit the affinity of their ``ray start``); default: any."""

    def __init__(self, start_timeout: float = 90.0,
                 cores: dict[str, set[int]] | None = None) -> None:
        self.temp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: socket paths
        self.port = _free_ports(1)[0]
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_ADDRESS": self.address}
        self.nodes: dict[str, subprocess.Popen] = {}
        self.start_timeout = start_timeout
        self.cores = cores or {}

    def _start(self, name: str, head: bool) -> None:
        ports = _free_ports(6)
        args = [_ray_cli(), "start", "--block", "--num-cpus=1", "--num-gpus=0",
                f"--resources={{\"node_{name}\": 1}}", "--node-ip-address=127.0.0.1",
                f"--object-store-memory={100 << 20}", "--disable-usage-stats",
                f"--node-manager-port={ports[0]}", f"--object-manager-port={ports[1]}",
                f"--dashboard-agent-listen-port={ports[2]}",
                f"--dashboard-agent-grpc-port={ports[3]}",
                f"--runtime-env-agent-port={ports[4]}", f"--metrics-export-port={ports[5]}"]
        if head:
            args += ["--head", f"--port={self.port}", "--include-dashboard=false",
                     f"--dashboard-port={_free_ports(1)[0]}",
                     f"--temp-dir={self.temp}"]
        else:
            args += [f"--address={self.address}"]
        cores = self.cores.get(name)
        log = open(self.temp / f"{name}.log", "wb")  # noqa: SIM115 - kept for the process
        with closing(log):
            self.nodes[name] = subprocess.Popen(
                args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=None if cores is None else lambda: os.sched_setaffinity(0, cores))

    def start(self, worker: bool = True) -> RayCluster:
        """Start the head node, then (``worker``) the worker node; wait until they are up."""
        self._start("head", head=True)
        self._wait_for_nodes(1)
        if worker:
            self._start("worker", head=False)
            self._wait_for_nodes(2)
        return self

    def _wait_for_nodes(self, count: int) -> None:
        deadline = time.monotonic() + self.start_timeout
        probe = ("import ray; ray.init(log_to_driver=False); "
                 "print(sum(n['Alive'] for n in ray.nodes()))")
        while time.monotonic() < deadline:
            for name, process in self.nodes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"ray node {name} exited: "
                                       f"{(self.temp / f'{name}.log').read_text()[-2000:]}")
            try:
                result = subprocess.run([sys.executable, "-c", probe], env=self.env,
                                        capture_output=True, text=True, timeout=30)
            except subprocess.TimeoutExpired:
                continue
            if result.returncode == 0 and result.stdout.strip().splitlines()[-1:] == [
                    str(count)]:
                return
            time.sleep(1.0)
        raise TimeoutError(f"the Ray cluster did not reach {count} nodes in "
                           f"{self.start_timeout:g} s")

    def kill(self, name: str) -> None:
        """SIGKILL every process of the node (its `ray start` session: raylet, agents,
        workers): the node is lost, as in a crash."""
        process = self.nodes.pop(name)
        for pid in _session(process.pid):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait(timeout=30)

    def processes(self) -> dict[str, list[int]]:
        """The live processes of each node (its ``ray start`` session)."""
        return {name: _session(process.pid) for name, process in self.nodes.items()}

    def stop(self) -> None:
        for name in list(self.nodes):
            self.kill(name)
        shutil.rmtree(self.temp, ignore_errors=True)


def _session(sid: int) -> list[int]:
    """Processes of session ``sid`` (one we started with start_new_session), from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[3]) == sid:  # after "pid (comm)": state, ppid, pgrp, session
                pids.append(int(entry.name))
    return pids
