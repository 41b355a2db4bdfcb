"""Full-size cost of each network: parameters, mult-adds, images/s and peak memory.

Each measurement runs in its own subprocess so that peak RSS (``ru_maxrss``) belongs to
that measurement alone. Weights are random (pretrained=False): speed and memory do not
depend on their values. Also measured: AmoebaNet-A's load from safetensors (peak RSS vs
file size) and what gradient checkpointing saves in a training step of NASNet-A large.

    python benchmarks/bench_large.py [--networks nasnet_large,...] [--repeats 3]

Writes benchmarks/results/large_networks.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_models import cpu_model, matmul_peak  # noqa: E402 (this folder is on sys.path)

RESULTS = Path(__file__).parent / "results" / "large_networks.json"
NETWORKS = ["nasnet_large", "pnasnet_large", "amoebanet_a_n18_f448", "nasnet_mobile",
            "mobilenet_v1_050_160"]

INFERENCE = """
import json, resource, sys, time, torch
import imvec
name, batch, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
module = imvec.load(name, pretrained=False, engine="fast")
h, w = imvec.get_expected_image_size(module)
images = torch.rand(batch, h, w, 3)
with torch.inference_mode():
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    module(images)  # warm-up: builds the inference graph
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        module(images)
        times.append(time.perf_counter() - start)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": sorted(times)[len(times) // 2],
                  "peak_rss_gib": peak / 2**20, "activation_rss_gib": (peak - base) / 2**20}))
"""

# Counted on the faithful graph: the inference graph's fused oneDNN convolutions are not
# operators that torch's flop counter knows.
COUNTING = """
import json, sys, torch
import imvec
from torch.utils.flop_counter import FlopCounterMode
module = imvec.load(sys.argv[1], pretrained=False, engine="faithful")
h, w = imvec.get_expected_image_size(module)
with torch.inference_mode(), FlopCounterMode(display=False) as counter:
    module(torch.rand(1, h, w, 3))
print(json.dumps({"params": sum(p.numel() for p in module.parameters()),
                  "macs": counter.get_total_flops() / 2}))
"""

TRAINING = """
import json, resource, sys, torch
import imvec
checkpointing, batch = sys.argv[1] == "1", int(sys.argv[2])
net = imvec.create_model("nasnet_large", num_classes=10).train()
net.set_grad_checkpointing(checkpointing)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
net(torch.rand(batch, 3, 331, 331) * 2 - 1).sum().backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"step_rss_gib": (peak - base) / 2**20}))
"""

LOADING = """
import json, resource, sys, torch
import imvec
from imvec.registry import find_card
from imvec.weights.convert import FORMAT, save_converted
path = sys.argv[1]
if sys.argv[2] == "write":
    card = find_card("amoebanet_a_n18_f448")
    with torch.device("meta"):
        net = card.build()
    net = net.to_empty(device="cpu")
    for t in net.state_dict().values():
        t.fill_(0.5) if t.is_floating_point() else t.zero_()
    save_converted(net, path, {"format": FORMAT, "arch": card.short_name, "network": card.network,
                               "hparams": "{}", "num_classes": "", "source": "benchmark",
                               "source_sha256": ""})
else:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    imvec.load(path)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"load_rss_gib": (peak - base) / 2**20}))
"""


def run(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1]) if out.strip() else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--networks", default=",".join(NETWORKS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    peak = matmul_peak(torch.get_num_threads())
    results = {"machine": platform.node(), "cpu": cpu_model(),
               "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M"), "matmul_peak_gflops": peak,
               "load_average_before": os.getloadavg(), "networks": {}}
    for name in args.networks.split(","):
        counted = run(COUNTING, name)
        one = run(INFERENCE, name, "1", str(args.repeats))
        eight = run(INFERENCE, name, "8", str(args.repeats))
        rate = max(1 / one["seconds"], 8 / eight["seconds"])
        results["networks"][name] = {
            "params_m": counted["params"] / 1e6, "mult_adds_g": counted["macs"] / 1e9,
            "images_per_s_b1": 1 / one["seconds"], "images_per_s_b8": 8 / eight["seconds"],
            "peak_rss_gib_b1": one["peak_rss_gib"], "peak_rss_gib_b8": eight["peak_rss_gib"],
            "fraction_of_matmul_peak": rate * 2 * counted["macs"] / 1e9 / peak,
        }
        print(name, results["networks"][name], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "amoebanet.safetensors")
        run(LOADING, path, "write")
        size = Path(path).stat().st_size / 2**30
        loaded = run(LOADING, path, "load")
        results["amoebanet_load"] = {"file_gib": size, **loaded,
                                     "ratio": loaded["load_rss_gib"] / size}
    print("amoebanet load", results["amoebanet_load"], flush=True)
    plain, ckpt = run(TRAINING, "0", "4"), run(TRAINING, "1", "4")
    results["nasnet_large_train_step_b4"] = {"plain_gib": plain["step_rss_gib"],
                                             "checkpointed_gib": ckpt["step_rss_gib"]}
    print("grad checkpointing", results["nasnet_large_train_step_b4"], flush=True)
    results["load_average_after"] = os.getloadavg()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nfp32 matmul peak: {peak:.0f} GFLOP/s\n")
    print("| network | params (M) | mult-adds (G) | img/s b1 | img/s b8 | peak RSS b1 (GiB) "
          "| peak RSS b8 (GiB) | % of matmul peak |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results["networks"].items():
        print(f"| {name} | {r['params_m']:.1f} | {r['mult_adds_g']:.2f} | "
              f"{r['images_per_s_b1']:.2f} | {r['images_per_s_b8']:.2f} | "
              f"{r['peak_rss_gib_b1']:.2f} | {r['peak_rss_gib_b8']:.2f} | "
              f"{100 * r['fraction_of_matmul_peak']:.0f} |")


if __name__ == "__main__":
    main()
