"""``imvec extract --runner ray -o FOLDER/`` on a real Ray cluster of 1 node vs 2 nodes.

    python benchmarks/bench_ray_nodes.py [--images 2000] [--rounds 3] [--shard-size 100]
        [--network nasnet_mobile]

Each run starts a fresh cluster (tests/extract/ray_cluster.py: ``ray start`` processes with
token auth, one CPU each): the head node pinned to core 0 and, for 2 nodes, a worker node
pinned to core 1 (CPU affinity, inherited by each node's raylet, agents and workers). The
driver, a fresh ``imvec extract`` process, is pinned to core 0 beside the head node, so
"1 node" is 1 core in all and "2 nodes" 2 cores. Actors compute and write their own shards
(``run_shards_ray``). The configurations take turns (1, 2, 1, 2, ...) on the same photos
(640x480 JPEGs from bench_pipeline.py) with random full-size weights.

Per run: the driver's wall time (start to exit), images/s over it, the steady rate (from
the shards' done markers: images after the first shard over the time from the first to the
last marker, i.e. without start-up), the driver's peak RSS and CPU time, each node's CPU
time, the machine's other load; then the same command again on the finished folder (the
resume: time to say "already complete"). Every run's vectors are checked against the
first run's. Before each round, the machine's own 2-core scaling for the same work without
Ray (one core alone, then both at once): the most 2 nodes can give here. Writes
benchmarks/results/ray_nodes.{json,md} (``--render JSON`` rewrites the report).
"""

from __future__ import annotations

import argparse
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

HERE = Path(__file__).parent
RESULTS = HERE / "results"
sys.path[:0] = [str(HERE), str(HERE.parent / "tests" / "extract")]
from bench_pipeline import _cpu_jiffies, make_photos, random_weights  # noqa: E402
from ray_cluster import RayCluster  # noqa: E402

DRIVER_CORE = 0
NODE_CORES = {"head": {0}, "worker": {1}}
TICK = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pids: list[int]) -> dict[int, float]:
    """{pid: CPU seconds so far} of ``pids`` (user + system), from /proc."""
    found = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        found[pid] = (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
    return found


class NodeCpu(threading.Thread):
    """CPU seconds each node's processes use from now to :meth:`stop`, sampled every
    ``every`` s: the raylet does not account its workers' time (an actor that ends
    between two samples loses at most its last ``every`` s)."""

    def __init__(self, cluster: RayCluster, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.cluster, self.every, self.halt = cluster, every, threading.Event()
        self.cores: dict[str, set[str]] = {}  # node -> the CPU lists its processes had
        self.first = self._sample()
        self.last = dict(self.first)

    def _sample(self) -> dict[tuple[str, int], float]:
        found = {}
        for node, pids in self.cluster.processes().items():
            self.cores.setdefault(node, set()).update(affinity(pids))
            found.update({(node, pid): cpu for pid, cpu in process_cpu_s(pids).items()})
        return found

    def run(self) -> None:
        while not self.halt.wait(self.every):
            self.last.update(self._sample())

    def stop(self) -> dict[str, float]:
        self.halt.set()
        self.join()
        self.last.update(self._sample())
        used: dict[str, float] = {}
        for (node, pid), cpu in self.last.items():
            used[node] = used.get(node, 0.0) + cpu - self.first.get((node, pid), 0.0)
        return {node: round(cpu, 1) for node, cpu in used.items()}


def affinity(pids: list[int]) -> list[str]:
    """The distinct CPU lists ``pids`` may run on (``Cpus_allowed_list``)."""
    found = set()
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        found |= {line.split(":")[1].strip() for line in status.splitlines()
                  if line.startswith("Cpus_allowed_list")}
    return sorted(found)


def steady_rate(done_times: list[float], shard_images: list[int]) -> float:
    """Images per second between the first and the last shard done (``done_times`` and
    ``shard_images`` in the same order): start-up and the first shard left out."""
    order = sorted(range(len(done_times)), key=done_times.__getitem__)
    if len(order) < 2:
        return 0.0
    span = done_times[order[-1]] - done_times[order[0]]
    return sum(shard_images[i] for i in order[1:]) / span if span > 0 else 0.0


def _calibrate(photos: Path, weights: Path, seconds: float) -> float:
    """Child: images/s of one core doing an actor's work without Ray (decode + resize, the
    model with one thread, batches of the extract default), for ``seconds``."""
    import torch

    import imvec
    from imvec.extract.job import default_batch_size

    torch.set_num_threads(1)
    module = imvec.load(str(weights))
    paths = sorted(photos.glob("*.jpg"))
    batch = default_batch_size(module.card.network)
    module(imvec.preprocess(paths[:batch], module))  # warm-up: the engine is built
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        first = done % (len(paths) - batch)
        module(imvec.preprocess(paths[first:first + batch], module))
        done += batch
    return done / (time.perf_counter() - start)


def ceiling(photos: Path, weights: Path, seconds: float = 6.0) -> dict:
    """The machine's own 2-core scaling for this work: the rate of :func:`_calibrate` alone
    on core 0, then on cores 0 and 1 at once (their sum over the one alone)."""
    def rates(cores: list[int]) -> list[float]:
        procs = [subprocess.Popen([sys.executable, __file__, "--calibrate", str(seconds),
                                   "--photos", str(photos), "--weights", str(weights)],
                                  stdout=subprocess.PIPE, text=True,
                                  preexec_fn=lambda c=core: os.sched_setaffinity(0, {c}))
                 for core in cores]
        return [float(proc.communicate()[0].split()[-1]) for proc in procs]

    alone, both = rates([0]), rates([0, 1])
    return {"alone": round(alone[0], 1), "both": [round(r, 1) for r in both],
            "ratio": round(sum(both) / alone[0], 2)}


def driver(command: list[str], env: dict) -> dict:
    """Run the ``imvec extract`` process pinned to DRIVER_CORE: wall and CPU seconds, peak
    RSS, its output."""
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        started, start = time.time(), time.perf_counter()
        proc = subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr,
                                preexec_fn=lambda: os.sched_setaffinity(0, {DRIVER_CORE}))
        _, status, usage = os.wait4(proc.pid, 0)  # the driver's own peak RSS and CPU
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out, err = (f.seek(0) or f.read() for f in (stdout, stderr))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"started": started, "wall_s": round(wall, 2),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024), "stdout": out.strip(),
            "stderr": err.strip()[-500:]}


def extract_command(photos: Path, weights: Path, out: Path, address: str,
                    shard_size: int) -> list[str]:
    return [sys.executable, "-c", "import sys; from imvec.cli import main; sys.exit(main())",
            "extract", str(photos), "-m", str(weights), "-o", str(out), "--runner", "ray",
            "--address", address, "--shard-size", str(shard_size), "-q"]


def shard_times(out: Path) -> tuple[list[float], list[int]]:
    """Done-marker mtimes and image counts of the shards of ``out``."""
    times, images = [], []
    for marker in sorted((out / "_done").glob("*.json")):
        record = json.loads(marker.read_text())
        times.append(marker.stat().st_mtime)
        images.append(record["rows"] + len(record["failures"]))
    return times, images


def measure(nodes: int, photos: Path, weights: Path, out: Path, shard_size: int) -> dict:
    """One run on a fresh cluster of ``nodes`` nodes, then its resume."""
    cluster = RayCluster(cores=NODE_CORES)
    try:
        cluster.start(worker=nodes == 2)
        time.sleep(2.0)  # the nodes' start-up work settles (prestarted workers import Ray)
        env = {k: v for k, v in cluster.env.items()
               if k not in ("OMP_NUM_THREADS", "IMVEC_THREADS", "OMP_WAIT_POLICY")}
        command = extract_command(photos, weights, out, cluster.address, shard_size)
        load_before = os.getloadavg()[0]
        sampler = NodeCpu(cluster)
        sampler.start()
        busy0, total0 = _cpu_jiffies()
        run = driver(command, env)
        busy1, total1 = _cpu_jiffies()
        node_cpu = sampler.stop()
        cores = os.cpu_count() or 1
        machine = (busy1 - busy0) / max(1, total1 - total0) * cores * run["wall_s"]
        others = max(0.0, machine - run["cpu_s"] - sum(node_cpu.values())) / run["wall_s"]
        times, images = shard_times(out)
        resume = driver(command, env)
        return {"nodes": nodes, **{k: run[k] for k in ("wall_s", "cpu_s", "peak_rss_mb")},
                "images": sum(images), "shards": len(images),
                "images_per_s": round(sum(images) / run["wall_s"], 2),
                "steady_images_per_s": round(steady_rate(times, images), 2),
                "first_shard_s": round(min(times) - run["started"], 1),
                "last_shard_to_exit_s": round(run["started"] + run["wall_s"] - max(times), 1),
                "shards_done_s": sorted(round(t - run["started"], 1) for t in times),
                "summary": run["stdout"], "node_cpu_s": node_cpu,
                "node_affinity": {n: sorted(c) for n, c in sampler.cores.items()},
                "others_cores": round(others, 2), "load1_before": round(load_before, 2),
                "load1_after": round(os.getloadavg()[0], 2),
                "resume": {k: resume[k] for k in ("wall_s", "cpu_s", "peak_rss_mb")}
                | {"said": resume["stderr"].splitlines()[-1:],
                   "already_complete": "already complete" in resume["stderr"]}}
    finally:
        cluster.stop()


def max_difference(out: Path, reference: dict) -> float:
    """Largest |difference| between the vectors of ``out`` and ``reference`` ({id: vector});
    every id must be there exactly once."""
    import numpy as np

    from imvec.extract.shards import read_dataset

    ids, features = read_dataset(out)
    if sorted(ids) != sorted(reference) or len(ids) != len(set(ids)):
        raise RuntimeError(f"{out}: not every image exactly once")
    return float(max(np.abs(features[k] - reference[i]).max() for k, i in enumerate(ids)))


def report(result: dict) -> str:
    """The Markdown report: one row per run, the scaling per round, what the numbers mean."""
    runs, meta, scaling = result["runs"], result["meta"], result["scaling"]
    lines = ["# imvec extract --runner ray: 1 node vs 2 nodes", "",
             f"{meta['date']}, {meta['cores']} cores ({meta['cpu']}), Ray {meta['ray']}, "
             f"imvec {meta['imvec']}; {meta['network']} with random full-size weights, "
             f"{meta['images']} photos 640x480, shards of {meta['shard_size']} images; "
             f"{meta['rounds']} rounds taking turns (`benchmarks/bench_ray_nodes.py`).", "",
             "| round | nodes (cores) | wall (s) | images/s | steady images/s | first shard "
             "(s) | driver peak RSS (MB) | driver CPU (s) | nodes' CPU (s) | images per node "
             "CPU-s | resume (s) | others' CPU (cores) | load1 |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in runs:
        node_cpu = ", ".join(f"{n} {c:g}" for n, c in r["node_cpu_s"].items())
        lines.append(f"| {r['round']} | {r['nodes']} | {r['wall_s']} | {r['images_per_s']} | "
                     f"{r['steady_images_per_s']} | {r['first_shard_s']} | "
                     f"{r['peak_rss_mb']} | {r['cpu_s']} | {node_cpu} | "
                     f"{r['images'] / sum(r['node_cpu_s'].values()):.1f} | "
                     f"{r['resume']['wall_s']} | {r['others_cores']} | "
                     f"{r['load1_before']}-{r['load1_after']} |")
    pinned = {n: sorted({c for r in runs for c in r["node_affinity"].get(n, [])})
              for n in meta["node_cores"]}
    complete = all(r["resume"]["already_complete"] for r in runs)
    machine = scaling.get("machine_ceiling")
    lines += ["", "Scaling, 2 nodes / 1 node, per round: images/s "
              f"{', '.join(map(str, scaling['images_per_s']))}; steady images/s "
              f"{', '.join(map(str, scaling['steady_images_per_s']))}"
              + (f"; the machine's own 2-core scaling for the same work without Ray "
                 f"(measured before each round): {', '.join(map(str, machine))}."
                 if machine else "."), "", _quietest(runs), "",
              "- **wall**: the `imvec extract --runner ray -o FOLDER/ --address ...` process, "
              "start to exit (imports, model load, listing, connecting, actors starting, "
              "the shards, the summary); **images/s** = images / wall.",
              "- **steady images/s**: from the shards' done markers, the images of all shards "
              "but the first over the time from the first shard done to the last: the "
              "cluster's rate once its actors run. **first shard**: seconds from the driver's "
              "start to the first shard done (start-up: imports, listing, actors loading "
              "torch and the model).",
              "- **driver peak RSS / CPU**: of the `imvec extract` process alone (`wait4`); "
              "**nodes' CPU**: what each node's processes (raylet, agents, actors) used "
              "during the run, sampled from /proc every 0.5 s; **images per node CPU-s**: "
              "images over the nodes' CPU time, whatever else the cores ran: lower with 2 "
              "nodes where two busy cores slow each other (shared caches, memory, host) or "
              "Ray's share-out costs.",
              "- **machine's own 2-core scaling**: one process doing an actor's work without "
              "Ray (decode + resize + the model on one thread, extract's batch size) for 6 s "
              "on core 0 alone, then one on each core at once: their summed rate over the "
              "one alone. A 6 s snapshot of what the second core gave just before the "
              "round; other people's jobs come and go within a round, so it shows the "
              "noise, not a bound.",
              "- **resume**: the same command again on the finished folder, start to exit"
              + (": each said \"already complete: nothing to compute\" without computing."
                 if complete else "; NOT every resume said \"already complete\" (see JSON)."),
              "- **others' CPU**: cores the rest of the machine used during the run "
              "(/proc/stat minus the driver and the nodes), and the 1-min load average "
              "before-after: the 2 cores are shared with other people's jobs, which slow "
              "whichever configuration they overlap.",
              f"- Pinning (CPU affinity of each `ray start`, inherited by its raylet, agents "
              f"and actors): head node on core {_cores(meta['node_cores']['head'])}, worker "
              f"node on core {_cores(meta['node_cores']['worker'])}, the driver on core "
              f"{meta['driver_core']} "
              f"beside the head node in both configurations. Affinity observed on the "
              f"nodes' processes during the runs: "
              + ", ".join(f"{n} {_cores(c)}" for n, c in pinned.items()) + ".",
              "- Both nodes are one machine: no network between them (the model and the "
              "shards go through local memory and disk), one disk and one memory bus shared. "
              "A real cluster adds transfer time and needs the output folder on a shared "
              "file system; it also runs each node on its own cores without a neighbour's "
              "driver.",
              "- Every run's vectors equal the first run's (max |difference| "
              f"{max(r['max_abs_diff_vs_first'] for r in runs):g}); every image once.", ""]
    return "\n".join(lines)


def _cores(cores: list) -> str:
    return ", ".join(map(str, cores))


def _quietest(runs: list[dict]) -> str:
    """A sentence on the round whose 2-node run the other jobs disturbed least."""
    pairs = {r["round"]: {} for r in runs}
    for r in runs:
        pairs[r["round"]][r["nodes"]] = r
    rnd, pair = min(pairs.items(), key=lambda p: p[1][2]["others_cores"])
    one, two = pair[1], pair[2]
    steady = two["steady_images_per_s"] / one["steady_images_per_s"]
    return (f"Least disturbed 2-node run (round {rnd}, others' CPU "
            f"{two['others_cores']} cores): {steady:.2f}x the 1-node steady rate, "
            f"{two['images_per_s'] / one['images_per_s']:.2f}x end to "
            f"end: the start-up ({one['first_shard_s']} s to the first shard with 1 node, "
            f"{two['first_shard_s']} s with 2) does not shrink with nodes.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--network", default="nasnet_mobile")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "imvec-bench")
    parser.add_argument("--output", type=Path, default=RESULTS / "ray_nodes")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="rewrite the report of an earlier run's JSON, measuring nothing")
    parser.add_argument("--calibrate", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--photos", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.calibrate:
        print(_calibrate(args.photos, args.weights, args.calibrate))
        return
    if args.render:
        args.render.with_suffix(".md").write_text(report(json.loads(args.render.read_text())))
        return
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("bench_ray_nodes: needs 2 cores (one per node)")
    photos = make_photos(args.data / f"photos-{args.images}", args.images)
    weights = random_weights(args.network, args.data)
    work = Path(tempfile.mkdtemp(prefix="bench-ray-nodes-"))
    runs, ceilings, reference = [], [], None
    try:
        for rnd in range(args.rounds):
            ceilings.append(ceiling(photos, weights))
            print(f"round {rnd} machine: {ceilings[-1]}", flush=True)
            for nodes in (1, 2):
                out = work / f"round{rnd}-nodes{nodes}"
                run = {"round": rnd, **measure(nodes, photos, weights, out, args.shard_size)}
                if reference is None:
                    from imvec.extract.shards import read_dataset

                    ids, features = read_dataset(out)
                    reference = dict(zip(ids, features, strict=True))
                run["max_abs_diff_vs_first"] = max_difference(out, reference)
                runs.append(run)
                shutil.rmtree(out)
                print(f"round {rnd} nodes {nodes}: {run['wall_s']:6.1f} s, "
                      f"{run['images_per_s']:.1f} img/s (steady {run['steady_images_per_s']})"
                      f", driver {run['peak_rss_mb']} MB, resume {run['resume']['wall_s']} s, "
                      f"others {run['others_cores']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import ray

    import imvec

    def ratios(key: str) -> list[float]:
        by = {(r["round"], r["nodes"]): r[key] for r in runs}
        return [round(by[k, 2] / by[k, 1], 2) for k in range(args.rounds)]

    result = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "cpu": platform.processor() or platform.machine(),
                       "cores": os.cpu_count(), "imvec": imvec.__version__,
                       "ray": ray.__version__, "network": args.network,
                       "images": args.images, "shard_size": args.shard_size,
                       "rounds": args.rounds,
                       "driver_core": DRIVER_CORE,
                       "node_cores": {n: sorted(c) for n, c in NODE_CORES.items()}},
              "scaling": {k: ratios(k) for k in ("images_per_s", "steady_images_per_s")}
              | {"machine_ceiling": [c["ratio"] for c in ceilings]},
              "ceilings": ceilings,
              "runs": runs}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    text = report(result)
    args.output.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
