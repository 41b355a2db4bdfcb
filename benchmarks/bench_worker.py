"""One benchmark contestant in its own process (and its own virtual environment).

Started by bench_models.py as ``python bench_worker.py KIND NETWORK SIZE THREADS``. It builds
the model, then answers JSON lines on stdin:

    {"cmd": "run", "batch": 16, "iters": 3}  ->  {"times": [s, ...], "cpu_times": [s, ...]}
    {"cmd": "memory"}                          ->  {"rss_mb": ..., "peak_rss_mb": ...}
    {"cmd": "trim"}                            ->  {"rss_mb": ...}  (malloc_trim)
    {"cmd": "quit"}

Only the protocol goes to stdout; anything the libraries print goes to stderr. KIND is one of
imvec (the default engine, "auto"), imvec-ENGINE, keras, timm-eager, timm-channels_last,
timm-compiled, timm-onnxruntime; a "-bf16" suffix runs it in bfloat16 (imvec-bf16: the
default engine with precision="bfloat16"; timm: weights and inputs in bfloat16; keras: the
"mixed_bfloat16" policy). This file imports only what its KIND needs, so it runs in the
Keras and timm environments too.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"

KERAS = {"nasnet_mobile": "NASNetMobile", "nasnet_large": "NASNetLarge",
         "mobilenet_v1_050_160": "MobileNet"}
TIMM = {"nasnet_large": "nasnetalarge", "pnasnet_large": "pnasnet5large",
        "mobilenet_v1_050_160": "mobilenetv1_100@0.5"}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build_imvec(engine: str, network: str, size: int, threads: int, bf16: bool = False):
    import numpy as np
    import torch

    import imvec

    torch.set_num_threads(threads)
    module = imvec.load(network, pretrained=False, engine=engine,
                        precision="bfloat16" if bf16 else None)
    inputs: dict[int, object] = {}

    def run(batch: int) -> None:
        if batch not in inputs:
            rng = np.random.default_rng(batch)
            inputs[batch] = torch.from_numpy(rng.random((batch, size, size, 3), np.float32))
        module(inputs[batch])

    return run


def _timm_model(network: str):
    import timm

    name = TIMM[network]
    if name == "mobilenetv1_100@0.5":  # timm's MobileNet V1 builder at width 0.5
        from timm.models.efficientnet import _gen_mobilenet_v1

        return _gen_mobilenet_v1("mobilenetv1_100", 0.5, pretrained=False, num_classes=0)
    return timm.create_model(name, pretrained=False, num_classes=0)


def build_timm(mode: str, network: str, size: int, threads: int, bf16: bool = False):
    import torch

    torch.set_num_threads(threads)
    model = _timm_model(network).eval()
    if mode == "onnxruntime":
        return _timm_onnxruntime(model, network, size, threads)
    layout = torch.channels_last if mode in ("channels_last", "compiled") else None
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = model.to(dtype)
    if layout is not None:
        model = model.to(memory_format=layout)
    if mode == "compiled":  # frozen weights, as imvec's compile engine has them
        model = torch.compile(model, options={"freezing": True})
    inputs: dict[int, object] = {}

    def run(batch: int) -> None:
        if batch not in inputs:
            x = torch.rand(batch, 3, size, size, dtype=dtype)
            inputs[batch] = x.contiguous(memory_format=layout) if layout else x
        with torch.inference_mode():
            model(inputs[batch])

    return run


def _timm_onnxruntime(model, network: str, size: int, threads: int):
    import numpy as np
    import onnxruntime as ort
    import torch

    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"timm-{network}-{size}-torch{torch.__version__}.onnx"
    if not path.is_file():  # exported once; later runs reuse it
        tmp = path.with_suffix(".tmp")
        with torch.no_grad():
            torch.onnx.export(model, (torch.rand(1, 3, size, size),), str(tmp), dynamo=False,
                              input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "batch"}}, opset_version=17)
        tmp.replace(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs: dict[int, object] = {}

    def run(batch: int) -> None:
        if batch not in inputs:
            inputs[batch] = np.random.default_rng(batch).random((batch, 3, size, size),
                                                                np.float32)
        session.run(None, {"x": inputs[batch]})

    return run


def build_keras(network: str, size: int, threads: int, bf16: bool = False):
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    if bf16:  # float32 variables, bfloat16 compute (Keras' mixed precision)
        tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    apps = tf.keras.applications
    kwargs = dict(weights=None, include_top=False, pooling="avg", input_shape=(size, size, 3))
    if network == "mobilenet_v1_050_160":
        kwargs["alpha"] = 0.5
    model = getattr(apps, KERAS[network])(**kwargs)
    forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    inputs: dict[int, object] = {}

    def run(batch: int) -> None:
        if batch not in inputs:
            rng = np.random.default_rng(batch)
            inputs[batch] = tf.constant(rng.random((batch, size, size, 3), np.float32))
        forward(inputs[batch]).numpy()

    return run


def build(kind: str, network: str, size: int, threads: int):
    bf16 = kind.endswith("-bf16")
    family, _, mode = kind.removesuffix("-bf16").partition("-")
    if family == "imvec":
        return build_imvec(mode or "auto", network, size, threads, bf16)
    if family == "timm":
        return build_timm(mode, network, size, threads, bf16)
    if family == "keras":
        return build_keras(network, size, threads, bf16)
    raise SystemExit(f"unknown contestant {kind!r}")


def main() -> None:
    kind, network, size, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # libraries' prints (also from C) go to stderr
    sys.stdout = sys.stderr
    started = time.perf_counter()
    run = build(kind, network, size, threads)
    rss_loaded = _rss_mb()
    protocol.write(json.dumps({"ready": True, "build_s": time.perf_counter() - started}) + "\n")
    warmed: set[int] = set()
    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "quit":
            break
        if request["cmd"] == "trim":  # hand freed activation memory back to the OS
            import contextlib
            import ctypes
            import gc

            gc.collect()
            with contextlib.suppress(OSError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            reply = {"rss_mb": _rss_mb()}
        elif request["cmd"] == "memory":
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            reply = {"rss_mb": _rss_mb(), "rss_loaded_mb": rss_loaded, "peak_rss_mb": peak}
        else:
            batch = request["batch"]
            warm_s = None
            if batch not in warmed:  # first call: compilation, packing, allocation
                t = time.perf_counter()
                run(batch)
                warm_s = time.perf_counter() - t
                warmed.add(batch)
            for _ in range(request.get("warm", 0)):  # untimed, e.g. after a trim
                run(batch)
            times, cpu = [], []
            for _ in range(request["iters"]):
                c, t = time.process_time(), time.perf_counter()
                run(batch)
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
            reply = {"times": times, "cpu_times": cpu, "warmup_s": warm_s}
        protocol.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
