"""The thread and process policy: how many threads and decoding processes imvec runs, and how
its threads wait, from the CPUs this process may really use.

A machine is rarely a job's alone (laptops, CI runners, several Ray actors per node, a
Kubernetes pod whose CPU quota is below the cores it sees). Three rules hold up there:

- **Count the CPUs this process may use**: its affinity mask and its cgroup CPU quota
  (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), not the cores it sees.
- **Do not oversubscribe**: compute threads = usable CPUs; on a CPU the decoding workers
  take turns with the model (``imvec.extract.pipeline``), so they are as many.
- **Wait by sleeping, not spinning**: a thread spinning at a barrier burns the core that the
  thread it waits for (preempted by another job) needs; with more runnable threads than
  cores, torch's OpenMP pool and ONNX Runtime's spinning threads ran 1.5-4x slower here.
  GNU OpenMP reads its spin count once, when torch loads, so ``import imvec`` sets it first
  (:func:`imvec._system.openmp_sleeps_when_idle`: a brief spin, then sleep).

Explicit settings win: ``$IMVEC_THREADS``, then ``$OMP_NUM_THREADS``, then a thread count
the user gave ``torch.set_num_threads``; ``$OMP_WAIT_POLICY`` / ``$GOMP_SPINCOUNT`` set by
the user are left alone, as is ``$IMVEC_ALLOW_SPINNING`` for ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path

from imvec.errors import InputError

__all__ = ["ENV_SPINNING", "ENV_THREADS", "allow_spinning", "apply_torch_threads",
           "cgroup_cpu_quota", "compute_threads", "decode_workers", "running_elsewhere",
           "usable_cpus", "user_threads"]

ENV_THREADS = "IMVEC_THREADS"
ENV_SPINNING = "IMVEC_ALLOW_SPINNING"
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
LOADAVG = Path("/proc/loadavg")  # its 4th field: running/all scheduling entities
OWN_TASKS = Path("/proc/self/task")
_SET_BY_US: list[int | None] = [None]  # the torch thread count imvec itself set last


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (all the machine's off Linux)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _cgroup_paths(proc_cgroup: Path) -> tuple[str | None, str | None]:
    """This process's cgroup v2 path and its v1 ``cpu`` controller path."""
    v2 = v1 = None
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _ancestors(mount: Path, path: str) -> list[Path]:
    """``mount/path`` and each folder above it up to ``mount``; in a container the recorded
    path is often the host's while the container sees its own cgroup at the mount root."""
    parts = [p for p in path.strip("/").split("/") if p]
    return [mount.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _read_v2(folder: Path) -> float | None:
    try:
        quota, _, period = (folder / "cpu.max").read_text().strip().partition(" ")
    except OSError:
        return None
    if quota == "max":
        return None
    return int(quota) / int(period or 100_000)


def _read_v1(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_cpu_quota(root: Path | None = None, proc_cgroup: Path | None = None,
                     ) -> float | None:
    """The CPU quota of this process's cgroup and the cgroups above it, in CPUs (e.g. 1.5);
    None when there is none. The tightest one on the way up is the one that throttles."""
    root = root or CGROUP_ROOT
    v2, v1 = _cgroup_paths(proc_cgroup or PROC_CGROUP)
    quotas: list[float] = []
    if v2 is not None:
        quotas += [q for f in _ancestors(root, v2) if (q := _read_v2(f)) is not None]
    if v1 is not None:
        for mount in (root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"):
            if mount.is_dir():
                quotas += [q for f in _ancestors(mount, v1) if (q := _read_v1(f)) is not None]
                break
    return min(quotas) if quotas else None


def usable_cpus() -> int:
    """The CPUs this process may really use: its affinity mask, capped by its cgroup quota.

    A fractional quota rounds to the nearest whole CPU (at least 1): half a core or more is
    worth a thread; less would mostly wait for the throttle."""
    cpus = affinity_cpus()
    quota = cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota + 0.5)))
    return cpus


def _positive_int(name: str) -> int | None:
    text = os.environ.get(name, "").split(",")[0].strip()  # OMP: "4,2" = nested levels
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise InputError(f"${name}={text!r}: expected a positive whole number of threads, "
                         f"e.g. {name}=4 (or unset it for one per usable CPU)")
    return value


def _torch_defaults() -> set[int]:
    """Thread counts torch picks by itself (all CPUs seen, the affinity mask, one per
    physical core): any other count was chosen by the user."""
    cores = set()
    for cpu in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology/thread_siblings_list"):
        with contextlib.suppress(OSError):
            cores.add(cpu.read_text().strip())
    return {n for n in (os.cpu_count(), affinity_cpus(), len(cores)) if n}


def _torch_user_threads() -> int | None:
    """A count the user gave ``torch.set_num_threads`` (torch loaded, its count neither its
    own default nor one imvec set)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    current = torch.get_num_threads()
    return None if current in (_SET_BY_US[0], *_torch_defaults()) else current


def user_threads() -> int | None:
    """The compute thread count the user chose, if any: ``$IMVEC_THREADS``, then a count
    given to ``torch.set_num_threads``, then ``$OMP_NUM_THREADS``."""
    return (_positive_int(ENV_THREADS) or _torch_user_threads()
            or _positive_int("OMP_NUM_THREADS"))


def compute_threads() -> int:
    """Threads for the model (torch's pool, ONNX Runtime's intra-op pool): the user's
    choice, else one per usable CPU, and no more than torch's own default where torch is
    loaded (one per physical core: SMT siblings gained nothing)."""
    chosen = user_threads()
    if chosen is not None:
        return chosen
    torch = sys.modules.get("torch")
    cpus = usable_cpus()
    return min(cpus, torch.get_num_threads()) if torch is not None else cpus


def decode_workers(overlap: bool = False) -> int:
    """Decoding processes. Taking turns with the model (on a CPU), one per usable CPU: they
    run while the model's threads sleep. Overlapping it (a GPU), one fewer, leaving a CPU
    for the process feeding the GPU."""
    cpus = usable_cpus()
    return max(1, cpus - 1) if overlap and cpus > 2 else cpus


def apply_torch_threads() -> int:
    """Set torch's intra-op thread count from the policy unless the user chose one; returns
    the count in force. For library calls (``module(images)``), when an engine is built."""
    import torch

    current = torch.get_num_threads()
    if _positive_int(ENV_THREADS) is None and _torch_user_threads() is not None:
        return current  # the user's own torch.set_num_threads
    target = _positive_int(ENV_THREADS) or min(current, usable_cpus())
    if target != current:
        torch.set_num_threads(target)
    _SET_BY_US[0] = target
    return target


def running_elsewhere(samples: int = 5, gap_s: float = 0.002) -> int | None:
    """Threads of other processes running or ready to run now: the fewest over a few
    samples of the kernel's count (``/proc/loadavg``), less this process's own. Unlike the
    load average, which keeps a finished job (or this one's own start-up) for minutes, it
    says what competes now. None where the kernel does not tell."""
    fewest = None
    for sample in range(samples):
        if sample:
            time.sleep(gap_s)
        try:
            running = int(LOADAVG.read_text().split()[3].partition("/")[0])
        except (OSError, ValueError, IndexError):
            return None
        mine = 0
        for task in OWN_TASKS.glob("*/stat"):
            with contextlib.suppress(OSError, IndexError):
                mine += task.read_text().rpartition(")")[2].split()[0] == "R"
        others = max(0, running - max(1, mine))  # the thread reading counts as running
        fewest = others if fewest is None else min(fewest, others)
    return fewest


def allow_spinning() -> bool:
    """Whether ONNX Runtime's idle threads spin (``session.intra_op.allow_spinning``), decided
    when a session starts: on a quiet machine spinning ran NASNet-A mobile 3-7% faster (and
    MobileNet at batch 1 about 1.5x); beside another job it ran MobileNet 1.2-4x slower. So:
    spin only without a CPU quota and with fewer threads of other processes running than a
    quarter of the usable CPUs (at least 0.5: none on a small machine). Where the kernel
    does not say (not Linux) the load average stands in. ``$IMVEC_ALLOW_SPINNING=1`` / ``0``
    decides instead."""
    chosen = os.environ.get(ENV_SPINNING, "").strip().lower()
    if chosen:
        return chosen in ("1", "true", "yes")
    if cgroup_cpu_quota() is not None:
        return False
    busy = running_elsewhere()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):  # not on Unix
            return True
    return busy < max(0.5, usable_cpus() / 4)
