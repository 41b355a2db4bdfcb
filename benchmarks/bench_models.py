"""imvec against Keras/TensorFlow, timm and ONNX Runtime on this machine, in one run.

    python benchmarks/bench_models.py                      # everything (~1 h on 2 cores)
    python benchmarks/bench_models.py --quick --networks nasnet_mobile,mobilenet_v1_050_160

Each contestant runs in its own process and its own virtual environment (imvec in the
current one, Keras in .venv-tf, timm in .venv-timm; see benchmarks/README.md) and stays
loaded for the whole network, so the contestants take turns: every round times each of
them once, in a rotating order, at the same batch size and thread count. Ratios are
paired by round (see paired_ratios), so a slow phase of the machine or load from other
programs hits both sides of a ratio alike; the load average at the start and the end is
recorded.

Writes benchmarks/results/<machine>.json, and beside it a report (<machine>.md) and a
chart (<machine>.png); ``--render FILE.json`` rewrites the report of an earlier run. Each
result is also given as a fraction of the machine's fp32 matmul peak (the best large sgemm
through torch.mm), with the network's FLOPs per image counted by torch.utils.flop_counter
on imvec's graph (2 per multiply-add).

Contestants ending in "-bf16" compute in bfloat16 (imvec: ``precision="bfloat16"``; timm:
weights and inputs in bfloat16; Keras: the "mixed_bfloat16" policy). They are measured in
the same rounds but compared apart: the float32 targets count float32 peers only, and the
bfloat16 table sets imvec-bf16 against the bfloat16 peers (and, as what a user gains by
choosing it, against the float32 ones), as a fraction of the bf16 matmul peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import select
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "bench_worker.py"

NETWORKS = {  # imvec short name: input size, contestants beside imvec's own engines
    "nasnet_large": (331, ["keras", "timm-eager", "timm-channels_last", "timm-compiled",
                           "timm-onnxruntime", "keras-bf16", "timm-channels_last-bf16",
                           "timm-compiled-bf16"]),
    "pnasnet_large": (331, ["timm-eager", "timm-channels_last", "timm-compiled",
                            "timm-onnxruntime", "timm-channels_last-bf16",
                            "timm-compiled-bf16"]),
    "amoebanet_a_n18_f448": (331, []),
    "nasnet_mobile": (224, ["keras", "keras-bf16"]),
    "mobilenet_v1_050_160": (160, ["keras", "timm-eager", "timm-channels_last",
                                   "timm-compiled", "timm-onnxruntime", "keras-bf16",
                                   "timm-channels_last-bf16", "timm-compiled-bf16"]),
}
BF16 = "-bf16"  # the suffix of the contestants that compute in bfloat16
LARGE = ("nasnet_large", "pnasnet_large", "amoebanet_a_n18_f448")
OURS = "imvec"  # the default engine ("auto"); "imvec-<engine>" are the others
OURS_BF16 = "imvec-bf16"  # the default engine with precision="bfloat16"
BASELINE = "imvec@base"  # with --baseline SRC: imvec's default engine from that source tree
TARGET_PEAK, TARGET_VS_BASELINES = 0.85, 1.5


# -- the machine -------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_name() -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", cpu_model().lower()).strip("-")
    slug = re.sub(r"-(processor|cpu|with-radeon.*)$", "", slug)
    return f"{slug}-{os.cpu_count()}c"


def matmul_peak(threads: int, size: int = 4096, reps: int = 5, dtype: str = "float32") -> float:
    """Best GFLOP/s of a large matmul through torch.mm (MKL / OpenBLAS sgemm for float32,
    oneDNN for bfloat16)."""
    import torch

    torch.set_num_threads(threads)
    kind = getattr(torch, dtype)
    a, b = torch.randn(size, size, dtype=kind), torch.randn(size, size, dtype=kind)
    out = torch.empty(size, size, dtype=kind)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e9


def flops_per_image(network: str, size: int) -> float:
    """FLOPs (2 per multiply-add) of one image through imvec's network, on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import imvec

    with torch.device("meta"):
        net = imvec.create_model(network).eval()
        with FlopCounterMode(display=False) as counter:
            net(torch.empty(1, 3, size, size))
    return float(counter.get_total_flops())


def memory_available() -> float:
    """Fraction of the machine's memory still available (1.0 where unknown)."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return int(info["MemAvailable"].split()[0]) / int(info["MemTotal"].split()[0])
    except (OSError, KeyError, ValueError):
        return 1.0


# -- contestants -------------------------------------------------------------------------

@dataclass
class Contestant:
    kind: str
    python: str
    process: subprocess.Popen | None = None
    error: str | None = None
    build_s: float | None = None
    times: dict[int, list[float]] = field(default_factory=dict)
    cpu_times: dict[int, list[float]] = field(default_factory=dict)
    turns: dict[int, list[float | None]] = field(default_factory=dict)  # median per round
    warmup_s: dict[int, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    worker_kind: str | None = None  # what bench_worker runs, when the label differs

    def start(self, network: str, size: int, threads: int, timeout: float) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
               "TF_CPP_MIN_LOG_LEVEL": "2", **self.env}
        self.process = subprocess.Popen(
            [self.python, str(WORKER), self.worker_kind or self.kind, network, str(size),
             str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log(network),
            text=True, env=env, cwd=str(ROOT))
        reply = self.ask(None, timeout)
        if reply is not None:
            self.build_s = reply.get("build_s")

    def _log(self, network: str):
        logs = ROOT / "benchmarks" / ".cache" / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        return open(logs / f"{network}-{self.kind}.log", "w")  # noqa: SIM115

    def ask(self, request: dict[str, Any] | None, timeout: float) -> dict[str, Any] | None:
        """Send a request (None: just read the greeting); None back if the worker failed."""
        if self.error or self.process is None:
            return None
        try:
            if request is not None:
                self.process.stdin.write(json.dumps(request) + "\n")
                self.process.stdin.flush()
            ready, _, _ = select.select([self.process.stdout], [], [], timeout)
            line = self.process.stdout.readline() if ready else ""
        except (BrokenPipeError, OSError) as exc:
            line, ready = "", [exc]
        if not line:
            why = "timed out" if not ready else f"exited with {self.process.poll()}"
            self.error = f"{why}; see benchmarks/.cache/logs"
            self.stop()
            return None
        return json.loads(line)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.process.stdin.flush()
                self.process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()


def default_engine(network: str) -> str:
    """The engine the "imvec" contestant (``engine="auto"``) runs for ``network``."""
    from imvec.engines.graph import check_engine
    from imvec.registry import find_card

    return check_engine("auto", False, find_card(network).network)


def contestants(network: str, default: str, args: argparse.Namespace) -> list[Contestant]:
    ours = [OURS] + [f"imvec-{e}" for e in args.engines if e != default]
    if "bfloat16" in args.precisions:
        ours.append(OURS_BF16)
    if network == "amoebanet_a_n18_f448":
        # ONNX: 1.9 GB of weights, over the 2 GB protobuf once exported. compile: minutes
        # of compilation and a second copy of the weights as constants, for the same
        # convolutions (on NASNet-large it ran at the speed of "fast").
        ours = [k for k in ours if k not in ("imvec-onnxruntime", "imvec-compile")]
    peers = [k for k in NETWORKS[network][1] if k.split("-")[0] in args.peers
             and (not k.endswith(BF16) or "bfloat16" in args.precisions)]
    if args.quick:
        peers = [k for k in peers if "compiled" not in k]
    pythons = {"imvec": sys.executable, "keras": args.keras_python, "timm": args.timm_python}
    found = []
    for kind in ours + peers:
        python = pythons[kind.split("-")[0]]
        c = Contestant(kind, python, env=dict(args.env))
        if not Path(python).exists():
            c.error = f"{python} not found (see benchmarks/README.md)"
        found.append(c)
    if args.baseline:  # the default engine from another source tree, e.g. a worktree of HEAD
        found.append(Contestant(BASELINE, sys.executable, worker_kind=OURS,
                                env={**args.env, "PYTHONPATH": args.baseline}))
    return found


# -- one network -------------------------------------------------------------------------

def bench_network(network: str, args: argparse.Namespace) -> dict[str, Any]:
    size = NETWORKS[network][0]
    default = default_engine(network)
    field_ = contestants(network, default, args)
    print(f"\n== {network} ({size}x{size}): {', '.join(c.kind for c in field_)}", flush=True)
    for c in field_:
        if c.error is None:
            t = time.perf_counter()
            c.start(network, size, args.threads, args.timeout)
            print(f"   {c.kind}: {'ready' if c.error is None else c.error} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
    live = [c for c in field_ if c.error is None]
    for batch in args.batch_sizes:
        for c in live:  # warm-up: compilation, weight packing, first allocations
            reply = c.ask({"cmd": "run", "batch": batch, "iters": 1}, args.timeout)
            if reply:
                c.warmup_s[batch] = reply["warmup_s"]
                c.times[batch] = list(reply["times"])
                c.cpu_times[batch] = list(reply["cpu_times"])
        for r in range(args.rounds):
            order = live[r % len(live):] + live[:r % len(live)] if live else []
            for c in order:
                if c.error:
                    continue
                last = statistics.median(c.times.get(batch) or [1.0])
                iters = max(1, min(50, round(args.round_seconds / max(last, 1e-3))))
                low_memory = args.low_memory or memory_available() < 0.25
                request = {"cmd": "run", "batch": batch, "iters": iters,
                           "warm": int(low_memory)}
                reply = c.ask(request, args.timeout)
                c.turns.setdefault(batch, []).append(
                    statistics.median(reply["times"]) if reply else None)
                if reply:
                    c.times.setdefault(batch, []).extend(reply["times"])
                    c.cpu_times.setdefault(batch, []).extend(reply["cpu_times"])
                if low_memory:  # all contestants stay loaded: return their activations
                    c.ask({"cmd": "trim"}, 120)
            line = ", ".join(
                f"{c.kind} {batch / statistics.median(c.times[batch]):.2f} "
                f"({1e3 * statistics.median(c.cpu_times[batch]) / batch:.1f})"
                for c in live if c.times.get(batch))
            print(f"   batch {batch} round {r + 1}/{args.rounds}: img/s (CPU ms/img) {line}",
                  flush=True)
    for c in live:
        c.memory = c.ask({"cmd": "memory"}, 60) or {}
        c.stop()
    return {
        "input_size": size,
        "default_engine": default,
        "results": {c.kind: summarize(c) for c in field_},
    }


def summarize(c: Contestant) -> dict[str, Any]:
    out: dict[str, Any] = {"error": c.error, "build_s": c.build_s, "memory": c.memory,
                           "batches": {}}
    for batch, times in c.times.items():
        if not times:
            continue
        out["batches"][str(batch)] = {
            "img_s": batch / statistics.median(times),
            "img_s_best": batch / min(times),
            "median_s": statistics.median(times),
            "cpu_s_per_image": statistics.median(c.cpu_times[batch]) / batch,
            "iterations": len(times),
            "round_medians_s": c.turns.get(batch, []),
            "warmup_s": c.warmup_s.get(batch),
        }
    return out


# -- analysis ----------------------------------------------------------------------------

def analyse(results: dict[str, Any], peak: float, peak_bf16: float | None = None) -> None:
    """Adds fractions of peak (bfloat16 contestants: of the bf16 peak), ratios (imvec /
    contestant), the issue's targets and the bfloat16 comparison."""
    for network, entry in results["networks"].items():
        gflops = entry["gflops_per_image"]
        runs = entry["results"]
        for kind, data in runs.items():
            own_peak = peak_bf16 if kind.endswith(BF16) and peak_bf16 else peak
            for stats in data["batches"].values():
                stats["peak_fraction"] = stats["img_s"] * gflops / own_peak
        ours = runs.get(OURS, {}).get("batches", {})
        entry["ratios"], entry["ratio_ranges"] = {}, {}
        for batch in ours:
            paired = {kind: paired_ratios(ours[batch], data["batches"][batch])
                      for kind, data in runs.items()
                      if kind != OURS and batch in data["batches"]}
            entry["ratios"][batch] = {k: statistics.median(v) for k, v in paired.items()}
            entry["ratio_ranges"][batch] = {k: [min(v), max(v)] for k, v in paired.items()}
        entry["targets"] = targets(network, entry, ours)
        entry["bf16"] = bf16_comparison(runs)


def paired_ratios(ours: dict[str, Any], theirs: dict[str, Any]) -> list[float]:
    """imvec's speed over the contestant's in each round: their median time per batch over
    ours, from turns taken seconds apart. The machine's speed drifts in phases of seconds
    to minutes (up to 1.6x on the 2-core VM), which shifts whole rounds but mostly spares
    the ratio within one; results without rounds fall back to the overall medians."""
    pairs = [(a, b) for a, b in zip(ours.get("round_medians_s", []),
                                    theirs.get("round_medians_s", []), strict=False)
             if a and b]
    if not pairs:
        return [ours["img_s"] / theirs["img_s"]]
    return [b / a for a, b in pairs]


def targets(network: str, entry: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    if not ours:
        return {}
    best_batch = max(ours, key=lambda b: ours[b]["img_s"])
    ratios = entry["ratios"][best_batch]
    ranges = entry.get("ratio_ranges", {}).get(best_batch, {})
    peers = {k: v for k, v in ratios.items()
             if not k.startswith("imvec") and not k.endswith(BF16)}
    checks: dict[str, Any] = {"best_batch": int(best_batch)}
    if peers:
        best_peer = min(peers, key=peers.get)
        checks["ahead_of_best_peer"] = {"peer": best_peer, "ratio": peers[best_peer],
                                        "range": ranges.get(best_peer),
                                        "met": peers[best_peer] > 1.0}
    for baseline in ("keras", "timm-eager"):
        if baseline in peers:
            checks[f"vs_{baseline}"] = {"ratio": peers[baseline],
                                        "range": ranges.get(baseline),
                                        "met": peers[baseline] >= TARGET_VS_BASELINES}
    if network in LARGE:
        fraction = ours[best_batch]["peak_fraction"]
        checks["peak_fraction"] = {"value": fraction, "met": fraction >= TARGET_PEAK}
    return checks


def bf16_comparison(runs: dict[str, Any]) -> dict[str, Any]:
    """imvec-bf16 at its best batch size against each contestant (paired ratios)."""
    ours = runs.get(OURS_BF16, {}).get("batches", {})
    if not ours:
        return {}
    best_batch = max(ours, key=lambda b: ours[b]["img_s"])
    ratios = {}
    for kind, data in runs.items():
        if kind != OURS_BF16 and best_batch in data["batches"]:
            paired = paired_ratios(ours[best_batch], data["batches"][best_batch])
            ratios[kind] = {"ratio": statistics.median(paired),
                            "range": [min(paired), max(paired)]}
    peers = {k: v["ratio"] for k, v in ratios.items() if k.endswith(BF16)}
    best_peer = min(peers, key=peers.get) if peers else None
    return {"best_batch": int(best_batch), "img_s": ours[best_batch]["img_s"],
            "peak_fraction": ours[best_batch].get("peak_fraction"), "ratios": ratios,
            "best_bf16_peer": best_peer}


# -- reports -----------------------------------------------------------------------------

def write_chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = results["settings"]["batch_sizes"]
    fig, axes = plt.subplots(1, len(batches), figsize=(7 * len(batches), 4.5), squeeze=False)
    networks = list(results["networks"])
    kinds = sorted({k for e in results["networks"].values() for k in e["results"]},
                   key=lambda k: (not k.startswith("imvec"), k))
    width = 0.8 / max(1, len(kinds))
    for ax, batch in zip(axes[0], batches, strict=True):
        for i, kind in enumerate(kinds):
            values = [results["networks"][n]["results"].get(kind, {}).get("batches", {})
                      .get(str(batch), {}).get("peak_fraction", 0.0) for n in networks]
            ax.bar([j + i * width for j in range(len(networks))], values, width, label=kind)
        ax.axhline(TARGET_PEAK, color="gray", linestyle="--", linewidth=1)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(networks))])
        ax.set_xticklabels(networks, rotation=15, fontsize=8)
        ax.set_ylabel("fraction of fp32 matmul peak")
        ax.set_title(f"batch {batch}, {results['settings']['threads']} threads")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{results['machine']['cpu']}: peak {results['machine']['peak_gflops']:.0f}"
                 " GFLOP/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def markdown(results: dict[str, Any], json_name: str, chart_name: str) -> str:
    m, s = results["machine"], results["settings"]
    batches = [str(b) for b in s["batch_sizes"]]
    lines = [
        "## Speed",
        "",
        "`imvec.load(...)` (trainable=False) runs an inference graph built from the faithful "
        "network (batch norm folded into the convolutions, relu and the combination adds "
        "fused), run by the engine `engine=\"auto\"` picks for the network (see "
        "`imvec.engines`). **imvec** below is that default, with its engine in brackets; "
        "`imvec-<engine>` are the others. "
        "Training, `variable_map` and fine-tuning keep the faithful graph.",
        "",
        f"Measured by `python benchmarks/bench_models.py` on {m['cpu']} ({m['cores']} cores, "
        f"{s['threads']} threads), {m['date']}, fp32 (rows ending in -bf16: bfloat16), "
        f"random weights. fp32 matmul peak (torch.mm, 4096²): **{m['peak_gflops']:.0f} "
        "GFLOP/s**" + (f"; bf16: {m['peak_bf16_gflops']:.0f} GFLOP/s (the % peak of the "
                       "-bf16 rows)" if m.get("peak_bf16_gflops") else "") + ". Load average "
        f"{m['loadavg_start']:.2f} at the start, {m['loadavg_end']:.2f} at the end"
        + (" (a shared machine: absolute numbers are low and noisy; the contestants took "
           "turns, so the ratios are the fair part)." if m["loadavg_start"] > 0.5 * m["cores"]
           else "."),
        "",
        *([f"`imvec@base` is imvec's default engine from `{s['baseline']}` (an older "
           "commit), in the same rounds: a regression check"
           + (f"; GOMP_SPINCOUNT={s['gomp_spincount']} for all." if s.get("gomp_spincount")
              else "."), ""] if s.get("baseline") else []),
        f"The contestants take turns: {s['rounds']} rounds, each timing every contestant "
        f"for about {s['round_seconds']:g} s, one after another. Ratio = imvec's speed over "
        "the contestant's, paired by round (their median time per batch in a round over "
        "imvec's in the same round), median over the rounds (> 1: imvec is faster); the "
        "targets table gives the range over the rounds too. This machine's speed drifts "
        "in phases of seconds to minutes, which moves whole rounds and spares the pairs. "
        "img/s: median over all timed batches. % peak = images/s × FLOPs per image / "
        "matmul peak. CPU ms/img is the process's CPU time (all its threads) per "
        "image: on a busy machine it shows the work done where wall time also shows the "
        "waiting (spinning thread pools count too). Raw numbers: "
        f"`benchmarks/results/{json_name}`.",
        "",
    ]
    for network, entry in results["networks"].items():
        lines += [f"### {network} ({entry['input_size']}², "
                  f"{entry['gflops_per_image']:.2f} GFLOP/image)", ""]
        head = "| contestant | " + " | ".join(
            f"img/s b{b} | ratio b{b} | % peak b{b}" for b in batches) + (
            f" | CPU ms/img b{batches[-1]} | peak RSS |")
        lines += [head, "|" + "---|" * (3 + 3 * len(batches))]
        for kind, data in entry["results"].items():
            cells = []
            for b in batches:
                stats = data["batches"].get(b)
                ratio = 1.0 if kind == OURS else entry["ratios"].get(b, {}).get(kind)
                cells += [_fmt(stats and stats["img_s"]), _fmt(stats and ratio),
                          _fmt(stats and 100 * stats["peak_fraction"], ".0f")]
            last = data["batches"].get(batches[-1])
            cells.append(_fmt(last and 1e3 * last["cpu_s_per_image"], ".1f"))
            rss = data.get("memory", {}).get("peak_rss_mb")
            name = (f"**{kind}** ({entry.get('default_engine', 'default')})" if kind == OURS
                    else kind)
            if data.get("error"):
                name += f" (failed: {data['error']})"
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {_fmt(rss, '.0f')} MB |")
        lines.append("")
    lines += ["### Targets (issue 7), at each network's best batch size", "",
              "| network | best batch | ahead of best peer | ≥1.5× Keras | ≥1.5× timm eager |"
              " ≥85% of peak |", "|---|---|---|---|---|---|"]
    for network, entry in results["networks"].items():
        t = entry.get("targets", {})

        def cell(key: str, value: str = "ratio", t: dict = t) -> str:
            if key not in t:
                return "n/a"
            v = t[key][value]
            text = f"{100 * v:.0f}%" if key == "peak_fraction" else f"{v:.2f}×"
            if t[key].get("range"):
                text += f" [{t[key]['range'][0]:.2f}–{t[key]['range'][1]:.2f}]"
            if key == "ahead_of_best_peer":
                text += f" ({t[key]['peer']})"
            return f"{text} {'met' if t[key]['met'] else '**not met**'}"

        lines.append(f"| {network} | {t.get('best_batch', '–')} | {cell('ahead_of_best_peer')}"
                     f" | {cell('vs_keras')} | {cell('vs_timm-eager')} | "
                     f"{cell('peak_fraction', 'value')} |")
    lines += bf16_markdown(results)
    lines += ["", f"![speed]({chart_name})", "",
              "Peak RSS is the contestant process's maximum resident memory over the run "
              "(weights, both batch sizes, and for imvec the faithful and the inference "
              "graph). Setup of the peers: `benchmarks/README.md`.", ""]
    lines += HOW.splitlines()
    return "\n".join(lines)


def bf16_markdown(results: dict[str, Any]) -> list[str]:
    rows = [(n, e["bf16"]) for n, e in results["networks"].items() if e.get("bf16")]
    if not rows:
        return []
    lines = ["", "### bfloat16 (`precision=\"bfloat16\"`, opt-in: ~0.4% error in the "
             "features), at imvec-bf16's best batch size", "",
             "Ratios: imvec-bf16's speed over the contestant's, paired by round. The float32 "
             "columns are what choosing bfloat16 gains over float32 code, not a like-for-like "
             "race; the bf16 peer column is.", "",
             "| network | batch | imvec-bf16 img/s | % bf16 peak | vs best bf16 peer | "
             "vs imvec (float32) | vs Keras (float32) | vs timm eager (float32) |",
             "|---|---|---|---|---|---|---|---|"]
    for network, c in rows:
        def ratio(kind: str | None, c: dict = c) -> str:
            r = c["ratios"].get(kind) if kind else None
            if not r:
                return "n/a"
            return f"{r['ratio']:.2f}× [{r['range'][0]:.2f}–{r['range'][1]:.2f}]"
        peer = c.get("best_bf16_peer")
        fraction = c.get("peak_fraction")
        lines.append(f"| {network} | {c['best_batch']} | {c['img_s']:.2f} | "
                     f"{_fmt(fraction and 100 * fraction, '.0f')} | "
                     f"{ratio(peer)}{f' ({peer})' if peer else ''} | {ratio(OURS)} | "
                     f"{ratio('keras')} | {ratio('timm-eager')} |")
    return lines


HOW = """
### How the inference graph gets its speed (each step measured on this 2-core EPYC)

Profiled with torch.profiler on NASNet-large at batch 16, the faithful graph spends 69% in
convolutions (75% of that in 1x1s, run in NCHW with a layout reorder per call), 10% in
relu, 5% in batch norm, 5% in average pooling, 4% in concatenation. The fast graph
(`imvec.engines.fast`) changes, in order of effect:

- **channels_last**: oneDNN's 1x1 convolutions run about twice as fast on NHWC as on
  NCHW (where each call reorders the layout), reaching 200+ GFLOP/s on 2 cores, above
  torch.mm's sgemm.
- **BN folded** into the preceding convolution (both halves of a factorized reduction fold
  their slice), **relu fused** into the convolution that produces a value only read
  through relu, and the **combination add fused** into the last convolution of one side
  (oneDNN post-ops). Each hidden state's relu is computed once, and a cell hands the next
  cells its output already relu'd (all of them relu it first).
- **glibc malloc tuning** (`imvec._system.tune_allocator`, on with the fast engine;
  `IMVEC_MALLOC_TUNING=0` turns it off): blocks over 32 MB are otherwise mmapped fresh
  and page-faulted on every call; that made a 114 MB concatenation 9x slower than the
  copy itself.
- **No padded copies**: TF's asymmetric 'SAME' padding of strided depthwise convolutions
  runs as a kernel with a zero first row/column and symmetric padding (1.5-2x faster than
  pad + conv); the factorized reduction's one-pixel shift is a padded strided 1x1 conv.
- **Weights packed** once into oneDNN's blocked layout; 1x1 convolutions under 8 MFLOP
  run as one BLAS matmul (oneDNN's ~30 us per call dominates there); 3x3 stride-1 max
  pooling as separable elementwise maxima (up to 4x faster than the pooling kernel, which
  also computes indices).

Tried and left out, because they did not pay in eager PyTorch: writing concatenation
inputs straight into slices of a preallocated buffer (elementwise ops on strided slices
ran 2x slower than the copy they save), average pooling as a depthwise convolution with
precomputed divisors (slower than the channels_last pooling kernel at batch 16),
splitting the batch over Python threads.

Engines: `engine="compile"` (the same graph in standard ops under `torch.compile`, with
frozen weights so that Inductor packs them for oneDNN and fuses relus and adds into the
convolutions) is the fastest engine on NASNet-mobile at batch 16 (98.6 img/s against 92.2
for ONNX Runtime in one session's measurements; unfrozen it did 81.7), but half as fast
as ONNX Runtime at batch 1, no faster than the eager graph where convolutions dominate
(NASNet-large), and it compiles for 30-50 s (NASNet-mobile) to minutes per batch size, so
"auto" does not pick it. `engine="onnxruntime"` (the fast graph exported to ONNX, cached
under `$IMVEC_HOME/onnx`) has the least overhead per operation and wins clearly on the
small networks; on the 331px networks it is a few % ahead of the eager graph at batch 16.
"auto" picks it everywhere but AmoebaNet-A (over ONNX's 2 GB limit). Torch's thread pool
and ONNX Runtime's spinning threads must not run at once: imvec checks the input range
with numpy (one thread; that made the ONNX Runtime engine 2-4x faster on MobileNet at
batch 1 than torch ops did) and ONNX Runtime scales it to [-1, 1] in its graph, on all
threads: numpy's scaling ran 3x slower right after a call, beside ONNX Runtime's
spin-waiting threads (MobileNet 4% faster at batch 16, 12% at batch 1 in its graph).
In the exported graph the first convolution reads the NHWC batch in place, as one-channel
`[B, 1, H, 3W]` images under a `k x 3k` kernel of stride `(s, 3s)`, with the scaling
folded into its weights (and into its bias where it reads no padding, as NASNet's stems):
no transpose and at most one pass over the images before it (MobileNet at batch 16: 2-9%
faster by the machine's phase, NASNet-mobile ~1%). The range check reads the images once,
as integers (the bits of floats in [0, 1] order as their values; min and max decide only
when that fails), and a module hands the numpy images to ONNX Runtime with no torch op on
the way (each costs ~50 us right after a call, when the caches are cold).

ONNX Runtime runs convolutions, pools, adds and concatenations in a blocked layout (16
channels per block with AVX-512, 8 with AVX2), but only where a tensor's channel count is a
multiple of the block: NASNet-mobile's 44 and 88 filters (and the stems' 11 and 22) are
not, so it ran its adds, relus and concatenations in NCHW between 93 layout reorders per
call. imvec pads every convolution's output channels to the block with zero weights
(`imvec.engines.onnx.nchwc`; the consumers read the real channels where they lie, and the
outputs are
gathered back in order): NASNet-mobile's bare graph at batch 16 went from 161-167 ms to
130-135 ms (1.24x), PNASNet-large ~2.5% faster, NASNet-large (168 -> 176 filters) level;
MobileNet has only aligned channels. The same network with 48 filters instead of 44 had
run 18% faster, which is what gave it away.

On a busy shared CPU, PyTorch's OpenMP threads spin-wait for each other between the
~1,000 operations of a NASNet; `OMP_WAIT_POLICY=PASSIVE` (set before Python starts) avoids
the stalls.
"""


# -- main --------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--networks", default=",".join(NETWORKS),
                   help=f"comma-separated subset of {', '.join(NETWORKS)}")
    p.add_argument("--batch-sizes", default="1,16", help="comma-separated (default: 1,16)")
    p.add_argument("--threads", type=int, default=default_threads,
                   help="threads for every contestant (default: the CPUs this process may use)")
    p.add_argument("--rounds", type=int, help="timing rounds per batch size (default 6; 2 quick)")
    p.add_argument("--round-seconds", type=float, default=1.5,
                   help="about how long one contestant's turn lasts (default: 1.5)")
    p.add_argument("--quick", action="store_true",
                   help="2 rounds, batch 16 only, no torch.compile contestants")
    p.add_argument("--engines", default="fast,onnxruntime,compile",
                   help="imvec engines besides the default, comma-separated: fast, "
                   "onnxruntime, compile, faithful (default: fast,onnxruntime,compile, "
                   "compile left out with --quick; the one the default picks for a network "
                   "is not run twice)")
    p.add_argument("--peers", default="keras,timm", help="peer families (default: keras,timm)")
    p.add_argument("--precisions", default="float32,bfloat16",
                   help="float32 always runs; bfloat16 adds imvec-bf16 and the -bf16 peers "
                   "(default: float32,bfloat16)")
    p.add_argument("--keras-python", default=str(ROOT / ".venv-tf" / "bin" / "python"))
    p.add_argument("--timm-python", default=str(ROOT / ".venv-timm" / "bin" / "python"))
    p.add_argument("--timeout", type=float, default=1800,
                   help="seconds a worker may take to build or answer (default: 1800)")
    p.add_argument("--omp-wait-policy", choices=("default", "passive", "active"),
                   default="default", help="OMP_WAIT_POLICY for every contestant (PyTorch's "
                   "OpenMP threads; TF and ONNX Runtime have their own pools). 'passive' keeps "
                   "a shared, busy machine from stalling PyTorch (default: left unset)")
    p.add_argument("--low-memory", action="store_true",
                   help="contestants hand their activation memory back after each turn and "
                   "take one untimed call first (automatic when under 25%% of the memory is "
                   "left; all contestants of a network stay loaded)")
    p.add_argument("--baseline", metavar="SRC", help="also time imvec's default engine from "
                   "this source folder (e.g. the src/ of a git worktree of an older commit), "
                   "as the contestant imvec@base: a regression check taking turns")
    p.add_argument("--machine", default=None, help="results name (default: from the CPU)")
    p.add_argument("--render", metavar="JSON", help="only write the report (markdown, chart) "
                   "of an earlier run's results file")
    args = p.parse_args(argv)
    args.networks = [n for n in args.networks.split(",") if n]
    unknown = set(args.networks) - set(NETWORKS)
    if unknown:
        p.error(f"unknown network(s) {sorted(unknown)}; choose from {', '.join(NETWORKS)}")
    args.batch_sizes = [16] if args.quick else [int(b) for b in args.batch_sizes.split(",")]
    args.rounds = args.rounds or (2 if args.quick else 6)
    args.engines = [e for e in args.engines.split(",") if e]
    if args.quick:
        args.engines = [e for e in args.engines if e != "compile"]
    args.peers = [p_ for p_ in args.peers.split(",") if p_]
    args.precisions = [p_ for p_ in args.precisions.split(",") if p_]
    args.env = {} if args.omp_wait_policy == "default" else {
        "OMP_WAIT_POLICY": args.omp_wait_policy.upper()}
    return args


def write_report(json_path: Path) -> str:
    """``<results>.md`` and ``<results>.png`` beside the results file; returns the markdown."""
    results = json.loads(json_path.read_text())
    chart = json_path.with_suffix(".png")
    try:
        write_chart(results, chart)
    except ImportError:
        print("matplotlib missing: no chart (pip install 'imvec[bench]')", file=sys.stderr)
    text = markdown(results, json_path.name, chart.name)
    json_path.with_suffix(".md").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        print(write_report(Path(args.render)))
        return 0
    import torch

    started = time.time()
    name = args.machine or machine_name()
    suffix = "-quick" if args.quick else ""
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    peaks = [matmul_peak(args.threads)]
    bf16_peaks = [matmul_peak(args.threads, dtype="bfloat16")] if (
        "bfloat16" in args.precisions) else []
    results: dict[str, Any] = {
        "machine": {"name": name, "cpu": cpu_model(), "cores": os.cpu_count(),
                    "date": time.strftime("%Y-%m-%d %H:%M"), "python": platform.python_version(),
                    "torch": torch.__version__, "loadavg_start": os.getloadavg()[0]},
        "settings": {"threads": args.threads, "batch_sizes": args.batch_sizes,
                     "rounds": args.rounds, "round_seconds": args.round_seconds,
                     "quick": args.quick, "dtype": "float32", "precisions": args.precisions,
                     "weights": "random",
                     "omp_wait_policy": args.omp_wait_policy, "baseline": args.baseline,
                     "gomp_spincount": os.environ.get("GOMP_SPINCOUNT")},
        "networks": {},
    }
    print(f"{results['machine']['cpu']}, {args.threads} threads: matmul peak "
          f"{peaks[0]:.0f} GFLOP/s, load {results['machine']['loadavg_start']:.2f}", flush=True)
    for network in args.networks:
        size = NETWORKS[network][0]
        entry = bench_network(network, args)
        entry["gflops_per_image"] = flops_per_image(network, size) / 1e9
        entry["loadavg_end"] = os.getloadavg()[0]
        results["networks"][network] = entry
        peaks.append(matmul_peak(args.threads))
    if bf16_peaks:
        bf16_peaks.append(matmul_peak(args.threads, dtype="bfloat16"))
        results["machine"].update(peak_bf16_gflops=max(bf16_peaks),
                                  peak_bf16_samples=bf16_peaks)
    results["machine"].update(peak_gflops=max(peaks), peak_samples=peaks,
                              loadavg_end=os.getloadavg()[0],
                              duration_min=(time.time() - started) / 60)
    analyse(results, max(peaks), max(bf16_peaks, default=None))
    json_path = out_dir / f"{name}{suffix}.json"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    text = write_report(json_path)
    print("\n" + text)
    print(f"wrote {json_path} and its report in {results['machine']['duration_min']:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
