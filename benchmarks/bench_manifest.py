"""Listing and resuming a sharded job at scale: the driver's memory and time vs N.

    python benchmarks/bench_manifest.py [--sizes 100000 1000000 10000000] [--shard-size 10000]

For each N, in a fresh process: stream N synthetic inputs (ids ``d123/img_0000123.jpg``)
into the manifest (``imvec.extract.manifest.write_manifest``, as a first run does), mark
90% of the shards done (their markers only), then plan the resume as a rerun does
(``imvec.extract.dataset.plan``: read each marker, find the pending shards) and read the
pending shards' inputs back. Reports the driver's peak RSS (``ru_maxrss``, imports
included) and the seconds of each step. The synthetic files do not exist, so the resume
step here skips the per-image stat that checks inputs; its cost is measured apart, on real
files (``--stat-files``), in microseconds per image, to extrapolate. Writes
benchmarks/results/manifest.json and manifest.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _child(n: int, shard_size: int) -> dict:
    from imvec.data.sources import Item
    from imvec.extract.dataset import plan
    from imvec.extract.manifest import read_manifest, write_manifest
    from imvec.extract.shards import done_marker, shard_path

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    record = {"model": {"weights_sha256": "0" * 64}}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        folder = Path(tmp)
        items = (Item(f"d{i // 1000:05d}/img_{i:09d}.jpg", f"/data/d{i // 1000:05d}/img_"
                      f"{i:09d}.jpg") for i in range(n))
        start = time.perf_counter()
        shards, images = write_manifest(folder, items, shard_size)
        listing = time.perf_counter() - start
        state = {"shards": shards, "images": images, "shard_size": shard_size}
        (folder / "_done").mkdir()
        for index in range(int(shards * 0.9)):
            done_marker(folder, index).write_text(json.dumps(
                {"rows": shard_size, "failures": [], "weights_sha256": "0" * 64}))
            shard_path(folder, index).touch()  # the shard's file (its content is not read)
        start = time.perf_counter()
        pending, _ = plan(folder, state, record, verify=False, check_inputs=False)
        planned = time.perf_counter() - start
        start = time.perf_counter()
        todo = sum(len(read_manifest(folder, k)) for k in pending)
        reread = time.perf_counter() - start
        disk = sum(p.stat().st_size for p in folder.rglob("*.parquet"))
    return {"images": n, "shards": shards, "pending_images": todo,
            "listing_s": round(listing, 2), "resume_plan_s": round(planned, 3),
            "pending_reread_s": round(reread, 2), "manifest_mb": round(disk / 2**20, 1),
            "rss_after_imports_mb": round(baseline), "peak_rss_mb": round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def _stat_rate(count: int) -> float:
    """Microseconds per image of the resume's input check (os.stat) on real files."""
    from imvec.extract.fingerprint import fingerprints

    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, f"{i}.jpg") for i in range(count)]
        for path in paths:
            Path(path).write_bytes(b"x")
        fingerprints(paths)
        start = time.perf_counter()
        fingerprints(paths)
        return (time.perf_counter() - start) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000,
                                                                 10_000_000])
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--stat-files", type=int, default=20_000)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.shard_size)))
        return
    rows = []
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--child", str(n), "--shard-size",
                              str(args.shard_size)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    stat_us = _stat_rate(args.stat_files)
    result = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "load_average": os.getloadavg(), "shard_size": args.shard_size,
              "stat_us_per_image": round(stat_us, 2), "runs": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "manifest.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["| images | shards | listing (s) | resume plan (s) | pending re-read (s) | "
             "manifest (MB) | driver RSS after imports (MB) | driver peak RSS (MB) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['images']:,} | {r['shards']:,} | {r['listing_s']} | {r['resume_plan_s']}"
              f" | {r['pending_reread_s']} | {r['manifest_mb']} | {r['rss_after_imports_mb']}"
              f" | {r['peak_rss_mb']} |" for r in rows]
    lines += ["", f"Shard size {args.shard_size:,}; 90% of the shards done before the resume. "
              f"Checking inputs on resume adds one stat per done image: {stat_us:.1f} us "
              f"per image here (local disk, warm cache), i.e. {stat_us * 1e-6 * 1e7:.0f} s at "
              "10^7 images. "
              f"{result['cpus']} CPUs, load average {result['load_average'][0]:.1f} at the end."]
    (RESULTS / "manifest.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
