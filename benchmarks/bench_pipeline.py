"""``imvec extract`` against TensorFlow's own pipeline, whole processes, on a machine that is
quiet, half busy, fully busy, running two jobs at once, and under a CPU quota.

    python benchmarks/bench_pipeline.py --tf-python /work/tfvenv/bin/python
        [--images 600] [--rounds 2] [--states quiet,half,all,two,quota]
        [--networks nasnet_mobile,mobilenet_v1_050_160] [--large 100]
        [--baseline /tmp/imvec-head/src --baseline-states quiet,two]

Contestants, each a fresh process timed from start to exit (imports, model build, listing,
decoding, the model, writing the output):

- ``imvec``: ``imvec extract FOLDER -m RANDOM.safetensors -o OUT.parquet`` with its defaults
  (the thread policy of imvec.engines.threads);
- ``tf``: what a TF-Hub user runs today: ``tf.data`` (list_files -> read_file -> decode_jpeg
  -> resize -> batch 32 -> prefetch(AUTOTUNE), parallel map) into Keras ``NASNetMobile`` /
  ``MobileNet(alpha=0.5, 160)`` ``predict`` (``include_top=False, pooling="avg"``), features
  saved with numpy. TensorFlow lives in its own venv (``--tf-python``): it pins its own
  numpy/protobuf. Install: ``python -m venv tfvenv && tfvenv/bin/pip install tensorflow-cpu``.
- ``imvec@base`` (with ``--baseline SRC``): imvec from another source tree (e.g. a worktree
  of HEAD) in the states named by ``--baseline-states`` (default: quiet), to show the
  policy keeps quiet-machine speed and what it changes under load.

Both sides run random weights (``weights=None`` in Keras, a full-size random safetensors
file for imvec): speed does not depend on the values. Inputs: 640x480 JPEGs (quality 90)
cut from the photos scikit-image ships (``pip install 'imvec[bench]'``), flipped, scaled
and cropped so that no two are the same file.

States: ``quiet``; ``half``: cores/2 busy-loop processes beside the job; ``all``: one per
core; ``two``: two jobs of the same contestant started together (each one's time); ``quota``:
the job alone in a cgroup whose CPU quota is half the cores (cgroup v2 ``cpu.max`` or v1
``cpu.cfs_quota_us``, else ``systemd-run --scope -p CPUQuota``; skipped, and said so, where
the machine allows none). Contestants take turns (the order flips each round), so drift in
the machine's load hits both; the ratio is computed per pair (TF time / imvec time). The
load average and the CPU the other processes used during each run are recorded: on a shared
machine they say how much to trust a number. Writes benchmarks/results/pipeline.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
NETWORKS = {  # imvec short name -> (Keras application, its arguments, input size)
    "nasnet_mobile": ("NASNetMobile", {}, 224),
    "mobilenet_v1_050_160": ("MobileNet", {"alpha": 0.5}, 160),
    "nasnet_large": ("NASNetLarge", {}, 331),
}
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
          "immunohistochemistry", "stereo_motorcycle", "retina", "colorwheel")
BUSY = "while True: pass"

TF_SCRIPT = r'''
import os, sys, numpy as np
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf
folder, app, kwargs, out = sys.argv[1], sys.argv[2], eval(sys.argv[3]), sys.argv[5]
size = int(sys.argv[4])
files = sorted(tf.io.gfile.glob(os.path.join(folder, "*.jpg")))
def load(path):
    image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
    image = tf.image.resize(image, (size, size))
    return image / 127.5 - 1.0
data = (tf.data.Dataset.from_tensor_slices(files)
        .map(load, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(32).prefetch(tf.data.AUTOTUNE))
model = getattr(tf.keras.applications, app)(weights=None, include_top=False, pooling="avg",
                                            input_shape=(size, size, 3), **kwargs)
features = model.predict(data, verbose=0)
np.save(out, features)
print(features.shape)
'''


def make_photos(folder: Path, count: int) -> Path:
    """``count`` different 640x480 JPEGs from scikit-image's photos (made once)."""
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) >= count:
        return folder
    import numpy as np
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(0)
    photos = []
    for name in PHOTOS:
        with contextlib.suppress(Exception):  # some are downloaded on first use: skip those
            image = getattr(skimage.data, name)()
            photos.append(Image.fromarray(image[0] if isinstance(image, tuple) else image))
    for index in range(count):
        photo = photos[index % len(photos)].convert("RGB")
        scale = rng.uniform(1.0, 2.0) * max(640 / photo.width, 480 / photo.height)
        photo = photo.resize((round(photo.width * scale) + 1, round(photo.height * scale) + 1))
        left = int(rng.integers(0, photo.width - 640 + 1))
        top = int(rng.integers(0, photo.height - 480 + 1))
        photo = photo.crop((left, top, left + 640, top + 480))
        if rng.random() < 0.5:
            photo = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        photo.save(folder / f"photo_{index:05d}.jpg", quality=90)
    return folder


def random_weights(name: str, folder: Path) -> Path:
    """A full-size network with random weights, as ``imvec convert`` would write it."""
    path = folder / f"{name}-random.safetensors"
    if path.is_file():
        return path
    from imvec.registry import find_card
    from imvec.weights.convert import FORMAT, save_converted

    card = find_card(name)
    metadata = {"format": FORMAT, "arch": card.short_name, "network": card.network,
                "hparams": json.dumps(dict(card.hparams), sort_keys=True), "num_classes": "",
                "source": "random weights (benchmarks/bench_pipeline.py)",
                "source_sha256": ""}
    return save_converted(card.build(**card.hparams), path, metadata)


class Quota:
    """Runs commands in a cgroup limited to ``cpus`` CPUs, where the machine lets us."""

    def __init__(self, cpus: float) -> None:
        self.cpus, self.folder, self.how = cpus, None, None
        period = 100_000
        v2 = Path("/sys/fs/cgroup/cgroup.controllers")
        candidates = ([(Path("/sys/fs/cgroup/imvec-bench"), "cpu.max",
                        f"{int(cpus * period)} {period}")] if v2.is_file() else
                      [(Path("/sys/fs/cgroup/cpu/imvec-bench"), "cpu.cfs_quota_us",
                        str(int(cpus * period)))])
        for folder, name, value in candidates:
            try:
                folder.mkdir(exist_ok=True)
                if name == "cpu.cfs_quota_us":
                    (folder / "cpu.cfs_period_us").write_text(str(period))
                (folder / name).write_text(value)
                self.folder, self.how = folder, f"cgroup {folder}/{name} = {value}"
                return
            except OSError:
                continue
        if shutil.which("systemd-run") and subprocess.run(
                ["systemd-run", "--scope", "-q", "-p", f"CPUQuota={int(cpus * 100)}%", "true"],
                capture_output=True).returncode == 0:
            self.how = f"systemd-run --scope -p CPUQuota={int(cpus * 100)}%"

    def wrap(self, command: list[str]) -> tuple[list[str], object]:
        if self.folder is not None:
            procs = self.folder / "cgroup.procs"
            return command, lambda: procs.write_text(str(os.getpid()))
        if self.how:
            return ["systemd-run", "--scope", "-q", "-p",
                    f"CPUQuota={int(self.cpus * 100)}%", *command], None
        raise RuntimeError("no CPU quota possible here")

    def close(self) -> None:
        if self.folder is not None:
            with contextlib.suppress(OSError):
                self.folder.rmdir()


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def run_jobs(commands: list[list[str]], env: dict, preexec=None) -> list[dict]:
    """Start ``commands`` together; each one's wall and CPU seconds, plus the CPU the rest
    of the machine used meanwhile (cores)."""
    busy0, total0 = _cpu_jiffies()
    start = time.perf_counter()
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              preexec_fn=preexec) for c in commands]
    results: list[dict] = [{} for _ in procs]

    def reap(index: int, proc: subprocess.Popen) -> None:  # each job's own end time
        _, status, usage = os.wait4(proc.pid, 0)
        results[index].update(wall_s=round(time.perf_counter() - start, 2),
                              cpu_s=round(usage.ru_utime + usage.ru_stime, 2),
                              code=os.waitstatus_to_exitcode(status))

    waiters = [threading.Thread(target=reap, args=(i, p)) for i, p in enumerate(procs)]
    for waiter in waiters:
        waiter.start()
    for waiter, proc, result in zip(waiters, procs, results, strict=True):
        err = proc.stderr.read().decode(errors="replace")
        waiter.join()
        proc.returncode = result.pop("code")
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, proc.args))} failed:\n{err[-3000:]}")
    busy1, total1 = _cpu_jiffies()
    elapsed = time.perf_counter() - start
    cores = (os.cpu_count() or 1)
    machine_busy = (busy1 - busy0) / max(1, total1 - total0) * cores  # cores in use
    ours = sum(r["cpu_s"] for r in results) / elapsed
    for r in results:
        r["others_cores"] = round(max(0.0, machine_busy - ours), 2)
        r["load1"] = round(os.getloadavg()[0], 2)
    return results


@contextlib.contextmanager
def busy_loops(count: int):
    procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(count)]
    time.sleep(0.3)
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def commands(contestant: str, name: str, folder: Path, weights: Path, out: Path,
             args: argparse.Namespace) -> tuple[list[str], dict]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "IMVEC_THREADS",
                        "IMVEC_ALLOW_SPINNING")}
    if contestant == "tf":
        app, kwargs, size = NETWORKS[name]
        return [args.tf_python, str(args.tf_script), str(folder), app, repr(kwargs), str(size),
                str(out.with_suffix(".npy"))], env
    if contestant == "imvec@base":
        env["PYTHONPATH"] = args.baseline
    return [sys.executable, "-c", "import sys; from imvec.cli import main; sys.exit(main())",
            "extract", str(folder), "-m", str(weights), "-o", str(out.with_suffix(".parquet")),
            "--overwrite", "-q"], env


def measure(state: str, contestant: str, name: str, folder: Path, weights: Path,
            work: Path, args: argparse.Namespace, quota: Quota | None) -> list[dict]:
    jobs = 2 if state == "two" else 1
    built = [commands(contestant, name, folder, weights, work / f"{contestant}-{i}", args)
             for i in range(jobs)]
    cmds, env = [c for c, _ in built], built[0][1]
    preexec = None
    if state == "quota":
        wrapped = [quota.wrap(c) for c in cmds]
        cmds, preexec = [c for c, _ in wrapped], wrapped[0][1]
    cores = os.cpu_count() or 1
    loops = {"half": max(1, cores // 2), "all": cores}.get(state, 0)
    with busy_loops(loops):
        return run_jobs(cmds, env, preexec)


def summarize(runs: list[dict], networks: list[str], states: list[str]) -> tuple[dict, str]:
    def times(net, state, who):
        return [j["wall_s"] for r in runs if (r["network"], r["state"], r["contestant"])
                == (net, state, who) for j in r["jobs"]]

    def pair_ratios(net, state):
        out = []
        for rnd in sorted({r["round"] for r in runs}):
            t = {r["contestant"]: max(j["wall_s"] for j in r["jobs"]) for r in runs
                 if (r["network"], r["state"], r["round"]) == (net, state, rnd)}
            if "tf" in t and "imvec" in t:
                out.append(round(t["tf"] / t["imvec"], 2))
        return out

    summary, lines = {}, []
    for net in networks:
        lines += [f"\n### {net} ({runs[0]['images'][net]} photos, 640x480)\n",
                  "| state | imvec (s) | TF tf.data + Keras (s) | TF / imvec per pair | "
                  "imvec vs its quiet | others' CPU (cores) |",
                  "|---|---|---|---|---|---|"]
        quiet = times(net, "quiet", "imvec")
        for state in states:
            imv, tf = times(net, state, "imvec"), times(net, state, "tf")
            if not imv:
                continue
            ratios = pair_ratios(net, state)
            kept = (f"{min(quiet) / max(imv) * 100:.0f}-{max(quiet) / min(imv) * 100:.0f}% "
                    "of its quiet rate" if quiet else "")
            if state == "two" and quiet:
                kept = (f"each {min(imv) / max(quiet):.2f}-{max(imv) / min(quiet):.2f}x "
                        "one alone")
            others = [j["others_cores"] for r in runs for j in r["jobs"]
                      if (r["network"], r["state"]) == (net, state)]
            lines.append(f"| {state} | {_span(imv)} | {_span(tf)} | "
                         f"{', '.join(map(str, ratios))} | {kept} | {_span(others)} |")
            summary[f"{net}/{state}"] = {"imvec_s": imv, "tf_s": tf, "ratios": ratios}
        based = [(st, times(net, st, "imvec@base")) for st in states]
        if any(b for _, b in based):
            lines += ["", "imvec@base (the code before the thread policy) beside imvec, same "
                      "rounds:", "", "| state | imvec@base (s) | imvec (s) |", "|---|---|---|"]
        for state, base in based:
            if base:
                lines.append(f"| {state} | {_span(base)} | "
                             f"{_span(times(net, state, 'imvec'))} |")
                summary[f"{net}/{state}/base"] = base
    return summary, "\n".join(lines)


def _span(values: list[float]) -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tf-python", default="/work/tfvenv/bin/python",
                        help="python of a venv with tensorflow (or tensorflow-cpu)")
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--large", type=int, default=0, metavar="N",
                        help="also NASNet-A large (331 px) on N photos (default: skip)")
    parser.add_argument("--rounds", type=int, default=2, help="pairs per state")
    parser.add_argument("--networks", default="nasnet_mobile,mobilenet_v1_050_160")
    parser.add_argument("--states", default="quiet,half,all,two,quota")
    parser.add_argument("--baseline", metavar="SRC",
                        help="an imvec source folder (e.g. a worktree of HEAD) to run beside")
    parser.add_argument("--baseline-states", default="quiet",
                        help="states in which the baseline runs too (default: quiet)")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "imvec-bench")
    parser.add_argument("--output", type=Path, default=RESULTS / "pipeline")
    args = parser.parse_args()
    networks = [n for n in args.networks.split(",") if n] + (["nasnet_large"] if args.large
                                                              else [])
    states = [s for s in args.states.split(",") if s]
    counts = {n: args.large if n == "nasnet_large" else args.images for n in networks}
    folders = {n: make_photos(args.data / f"photos-{counts[n]}", counts[n]) for n in networks}
    weights = {n: random_weights(n, args.data) for n in networks}
    args.tf_script = args.data / "tf_pipeline.py"
    args.tf_script.write_text(TF_SCRIPT)
    quota = Quota((os.cpu_count() or 2) / 2) if "quota" in states else None
    if quota is not None and quota.how is None:
        print("no CPU quota possible on this machine: the quota state is skipped")
        states.remove("quota")
    runs: list[dict] = []
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    try:
        for rnd in range(args.rounds):
            for net in networks:
                for state in states:
                    order = ["imvec", "tf"] if rnd % 2 == 0 else ["tf", "imvec"]
                    if args.baseline and state in args.baseline_states.split(","):
                        order.append("imvec@base")
                    for who in order:
                        jobs = measure(state, who, net, folders[net], weights[net], work,
                                       args, quota)
                        runs.append({"round": rnd, "network": net, "state": state,
                                     "contestant": who, "jobs": jobs, "images": counts})
                        print(f"round {rnd} {net:22} {state:6} {who:10} "
                              + " ".join(f"{j['wall_s']:6.2f}s (cpu {j['cpu_s']:.1f}s, "
                                         f"others {j['others_cores']:.2f})" for j in jobs),
                              flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if quota is not None:
            quota.close()
    summary, table = summarize(runs, networks, states)
    import imvec

    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "imvec": imvec.__version__, "quota": quota.how if quota else None,
            "tf": subprocess.run([args.tf_python, "-c", "import tensorflow as tf; "
                                  "print(tf.__version__)"], capture_output=True,
                                 text=True).stdout.strip(),
            "load_avg_end": os.getloadavg()}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "summary": summary, "runs": runs}, indent=1) + "\n")
    header = (f"# imvec extract vs TensorFlow tf.data + Keras\n\n{meta['date']}, "
              f"{meta['cores']} cores ({meta['cpu']}), TF {meta['tf']}, random weights on both "
              f"sides, whole processes, taking turns. Quota state: {meta['quota'] or 'none'}. "
              f"Load average at the end: {', '.join(f'{x:.1f}' for x in meta['load_avg_end'])}.\n")
    args.output.with_suffix(".md").write_text(header + table + "\n")
    print(header + table)


if __name__ == "__main__":
    main()
