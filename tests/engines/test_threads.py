"""The thread and process policy: counts from a faked affinity and cgroup quota, explicit
user settings winning, and sessions / pools / actors getting the counts."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from imvec import _system
from imvec.engines import threads
from imvec.errors import InputError


def _cgroup_v2(tmp_path, cpu_max: str, path: str = "/job/step") -> None:
    (tmp_path / "proc").write_text(f"0::{path}\n")
    folder = tmp_path / "fs" / path.strip("/")
    folder.mkdir(parents=True)
    (folder / "cpu.max").write_text(cpu_max + "\n")
    (tmp_path / "fs" / "cpu.max").write_text("max 100000\n")


def _cgroup_v1(tmp_path, quota: int, period: int = 100_000, path: str = "/pod") -> None:
    (tmp_path / "proc").write_text(f"4:memory:{path}\n3:cpu,cpuacct:{path}\n0::/\n")
    folder = tmp_path / "fs" / "cpu,cpuacct" / path.strip("/")
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (folder / "cpu.cfs_period_us").write_text(f"{period}\n")


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A fake machine: ``machine(cpus)`` sets the affinity mask size; the cgroup files
    live under tmp_path; no user setting in the environment."""
    for name in (threads.ENV_THREADS, "OMP_NUM_THREADS", threads.ENV_SPINNING):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "CGROUP_ROOT", tmp_path / "fs")
    monkeypatch.setattr(threads, "PROC_CGROUP", tmp_path / "proc")
    (tmp_path / "fs").mkdir()
    (tmp_path / "proc").write_text("0::/\n")

    def set_cpus(cpus: int) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)),
                            raising=False)
    set_cpus(8)
    return set_cpus


@pytest.mark.parametrize(("cpu_max", "usable"), [("max 100000", 8), ("200000 100000", 2),
                                                  ("150000 100000", 2), ("140000 100000", 1),
                                                  ("20000 100000", 1), ("5000000 100000", 8)])
def test_usable_cpus_from_a_cgroup_v2_quota(machine, tmp_path, cpu_max, usable):
    _cgroup_v2(tmp_path, cpu_max)
    assert threads.usable_cpus() == usable


def test_usable_cpus_from_a_cgroup_v1_quota_and_the_affinity(machine, tmp_path):
    _cgroup_v1(tmp_path, quota=300_000)
    assert threads.cgroup_cpu_quota() == 3.0
    assert threads.usable_cpus() == 3
    machine(2)  # taskset to 2 CPUs: the tighter limit wins
    assert threads.usable_cpus() == 2


def test_no_quota_v1_is_minus_one(machine, tmp_path):
    _cgroup_v1(tmp_path, quota=-1)
    assert threads.cgroup_cpu_quota() is None
    assert threads.usable_cpus() == 8


def test_a_parent_cgroups_quota_applies(machine, tmp_path):
    _cgroup_v2(tmp_path, "max 100000", path="/a/b")
    (tmp_path / "fs" / "a" / "cpu.max").write_text("100000 100000\n")
    assert threads.usable_cpus() == 1


def test_a_container_sees_its_own_cgroup_at_the_mount_root(machine, tmp_path):
    """/proc/self/cgroup names the host's path; the container mounts its cgroup at root."""
    (tmp_path / "proc").write_text("0::/kubepods/pod1/abc\n")
    (tmp_path / "fs" / "cpu.max").write_text("250000 100000\n")
    assert threads.cgroup_cpu_quota() == 2.5
    assert threads.usable_cpus() == 3


def test_decode_workers_and_compute_threads_do_not_oversubscribe(machine, tmp_path):
    _cgroup_v2(tmp_path, "200000 100000")
    assert threads.decode_workers() == 2  # taking turns with the model
    assert threads.compute_threads() == min(2, torch.get_num_threads())
    machine(1)
    assert threads.decode_workers() == 1
    assert threads.decode_workers(overlap=True) == 1


def test_imvec_threads_wins(machine, tmp_path, monkeypatch):
    _cgroup_v2(tmp_path, "100000 100000")
    monkeypatch.setenv(threads.ENV_THREADS, "3")
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert threads.compute_threads() == 3


def test_omp_num_threads_is_the_users_choice(machine, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "6,2")
    monkeypatch.setattr(threads, "_torch_user_threads", lambda: None)
    assert threads.compute_threads() == 6


@pytest.mark.parametrize("text", ["0", "-2", "four"])
def test_a_bad_imvec_threads_is_one_line_naming_the_fix(machine, monkeypatch, text):
    monkeypatch.setenv(threads.ENV_THREADS, text)
    with pytest.raises(InputError, match=r"IMVEC_THREADS=.*positive whole number.*e\.g\."):
        threads.compute_threads()


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    threads._SET_BY_US[0] = None
    yield
    torch.set_num_threads(before)
    threads._SET_BY_US[0] = None


def test_library_calls_get_the_quota_not_every_core(machine, tmp_path, monkeypatch,
                                                    torch_threads):
    monkeypatch.setattr(threads, "_torch_defaults", lambda: {8})
    torch.set_num_threads(8)  # torch's own default on this fake 8-CPU machine
    _cgroup_v2(tmp_path, "200000 100000")
    assert threads.apply_torch_threads() == 2
    assert torch.get_num_threads() == 2
    assert threads.user_threads() is None  # imvec's own setting is not the user's


def test_torch_set_num_threads_by_the_user_wins(machine, tmp_path, monkeypatch,
                                                torch_threads):
    monkeypatch.setattr(threads, "_torch_defaults", lambda: {8})
    torch.set_num_threads(3)  # the user's call
    _cgroup_v2(tmp_path, "100000 100000")
    assert threads.apply_torch_threads() == 3
    assert torch.get_num_threads() == 3


def test_onnxruntime_sessions_get_the_policy(machine, tmp_path, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    from imvec.engines.onnx import runtime

    seen = {}

    class Session:
        def __init__(self, path, options, providers):
            seen["threads"] = options.intra_op_num_threads
            seen["spin"] = options.get_session_config_entry("session.intra_op.allow_spinning")

    monkeypatch.setattr(ort, "InferenceSession", Session)
    _running(monkeypatch, tmp_path, total=5)  # a busy machine
    monkeypatch.setenv(threads.ENV_THREADS, "3")
    runtime.onnxruntime_session("net.onnx")
    assert seen == {"threads": 3, "spin": "0"}
    monkeypatch.setenv(threads.ENV_SPINNING, "1")
    runtime.onnxruntime_session("net.onnx", threads=1)
    assert seen == {"threads": 1, "spin": "1"}


def _running(monkeypatch, tmp_path, total, mine=("R",), load=None) -> None:
    """A kernel that counts ``total`` running threads, ``mine`` the states of this
    process's threads; ``total=None``: a kernel that does not say (then ``load``)."""
    loadavg = tmp_path / "loadavg"
    if total is not None:
        loadavg.write_text(f"0.00 0.00 0.00 {total}/300 4242\n")
    monkeypatch.setattr(threads, "LOADAVG", loadavg)
    tasks = tmp_path / "task"
    for n, state in enumerate(mine):
        (tasks / str(n)).mkdir(parents=True)
        (tasks / str(n) / "stat").write_text(f"{n} (python (x) y) {state} 1 2 3\n")
    monkeypatch.setattr(threads, "OWN_TASKS", tasks)
    if load is not None:
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))


@pytest.mark.parametrize(("cpus", "total", "mine", "spins"), [
    (2, 1, "R", True),  # only the thread asking
    (2, 2, "R", False),  # one other thread running: half the machine
    (2, 2, "RRS", True),  # the other thread running is this process's own
    (8, 2, "R", True), (8, 3, "R", False),  # a quarter of 8 CPUs: 2
    (16, 4, "R", True), (16, 5, "R", False)])
def test_onnxruntime_spins_only_while_no_other_job_runs(machine, tmp_path, monkeypatch, cpus,
                                                         total, mine, spins):
    """What runs now decides, not the load average: a job that just ended (or this one's
    own start-up) kept the load above the bar for a minute, and library calls lost up to
    35% on a quiet machine (benchmarks/results/policy-vs-6f36cde.md)."""
    machine(cpus)
    _running(monkeypatch, tmp_path, total, tuple(mine), load=5.0)
    assert threads.allow_spinning() is spins


@pytest.mark.parametrize(("total", "load", "cpu_max", "env", "spins"), [
    (None, 0.1, None, None, True), (None, 5.0, None, None, False),
    (None, 1.5, None, None, True), (1, 0.1, "100000 100000", None, False),
    (5, 5.0, None, "1", True), (1, 0.1, None, "0", False)])
def test_without_the_kernels_count_the_load_average_decides_and_quota_or_env_win(
        machine, tmp_path, monkeypatch, total, load, cpu_max, env, spins):
    _running(monkeypatch, tmp_path, total, load=load)
    if cpu_max:
        _cgroup_v2(tmp_path, cpu_max)
    if env:
        monkeypatch.setenv(threads.ENV_SPINNING, env)
    assert threads.allow_spinning() is spins


def test_a_busy_process_beside_is_seen_running(machine, monkeypatch):
    """The real kernel count: a busy loop in another process is one thread running."""
    if not threads.LOADAVG.exists():
        pytest.skip("no /proc/loadavg")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert threads.running_elsewhere() >= 1
        machine(2)
        assert threads.allow_spinning() is False
    finally:
        busy.kill()
        busy.wait()


def test_the_decode_pool_gets_the_quota(machine, tmp_path):
    from imvec.extract.pool import default_workers

    _cgroup_v1(tmp_path, quota=200_000)
    assert default_workers() == 2


def test_ray_actors_share_the_cpus(machine, monkeypatch):
    from imvec.extract.ray_engine import actor_threads

    monkeypatch.setattr(threads, "_torch_user_threads", lambda: None)
    assert actor_threads(cpus=8, replicas=8, gpus=0) == 1  # one actor per CPU
    assert actor_threads(cpus=8, replicas=2, gpus=0) == 4
    assert actor_threads(cpus=8, replicas=1, gpus=1) == 1
    monkeypatch.setenv(threads.ENV_THREADS, "2")
    assert actor_threads(cpus=8, replicas=8, gpus=0) == 2


def test_openmp_spins_briefly_unless_the_user_chose(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch")  # as before torch loads
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"):
        monkeypatch.delenv(name, raising=False)
    assert _system.openmp_sleeps_when_idle()
    assert os.environ["GOMP_SPINCOUNT"] == "1000"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert not _system.openmp_sleeps_when_idle()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE" and "GOMP_SPINCOUNT" not in os.environ


def test_a_fresh_imvec_process_sets_brief_spinning_before_torch():
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY",
                                                              "GOMP_SPINCOUNT")}
    code = "import imvec, os, torch; print(os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "1000"


def test_ray_decode_tasks_run_opencv_on_their_one_cpu(tmp_path):
    cv2 = pytest.importorskip("cv2")
    import numpy as np
    from PIL import Image

    from imvec.data.preprocess import Preprocessing
    from imvec.extract.ray_engine import _decode

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    before = cv2.getNumThreads()
    cv2.setNumThreads(4)
    try:
        out = _decode({"id": np.array(["a"]), "path": np.array([str(tmp_path / "a.png")])},
                      Preprocessing(size=(4, 4)))
        assert out["error"][0] == ""
        assert cv2.getNumThreads() == 1
    finally:
        cv2.setNumThreads(before)
