"""How a module runs at inference: its engine, built once, separate from the faithful net.

Engines (``imvec.load(..., engine=...)``; measurements in benchmarks/results/amd-epyc-2c.md):

``"auto"`` (the default)
    ``"faithful"`` for a trainable module. Otherwise the engine measured fastest on a CPU:
    ``"onnxruntime"`` when ONNX Runtime is installed (``pip install 'imvec[onnx]'``),
    except for AmoebaNet-A; else ``"fast"``. ``$IMVEC_ENGINE`` overrides the choice.
``"fast"``
    :func:`imvec.engines.fast.fast_network`: BN folded into the convolutions, channels_last,
    relu and adds fused into oneDNN convolutions, each relu computed once. Same outputs as
    the faithful graph to ~1e-6 relative; end points; every network.
``"compile"``
    The fast graph in standard ops under ``torch.compile`` with frozen weights
    (:mod:`imvec.engines.compiled`; needs a C++ compiler; each new input shape compiles
    first, 30-50 s for NASNet-mobile): pays off on long jobs.
``"onnxruntime"``
    The fast graph exported to ONNX (:mod:`imvec.engines.onnx`), channels padded to the
    CPU's blocked layout, run by ONNX Runtime: the least overhead per operation. Exported
    on the first call of each size and cached under ``$IMVEC_HOME/onnx``. No end points
    (``as_dict=True`` runs ``"fast"``); inputs off the CPU run ``"fast"`` under "auto".
``"faithful"``
    The training graph in eval mode: the reference, and what ``trainable=True`` runs.

Precision (``imvec.load(..., precision=...)``, :mod:`imvec.engines.precision`):
``"float32"`` (the default) gives TensorFlow's outputs to float32 rounding. ``"bfloat16"``
runs the fast or compiled graph with bfloat16 weights and activations (~0.4% of the
largest feature on the TF fixtures, cosine >= 0.99999), for CPUs with AVX512-BF16 or AMX.
Images and features stay float32; BN is folded in float32 before rounding. ONNX Runtime
has no bfloat16 CPU kernels, so "auto" picks "fast".

The faithful network is never changed: ``variable_map``, ``state_dict`` and fine-tuning see
the original variables. A built engine is dropped (and rebuilt on the next call) when the
faithful weights change (``load_state_dict``, ``.to()``, an in-place op); writes that
bypass autograd's version counters (``parameter.data.mul_(...)``, numpy views of the
weights) need ``module.rebuild_engine()``.
"""

from __future__ import annotations

import importlib.util
import operator
import os
import threading
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from imvec._system import auto_tune_allocator
from imvec.engines.compiled import compiled
from imvec.engines.fast import fast_network
from imvec.engines.precision import PRECISIONS, check_precision, in_precision
from imvec.engines.scaling import to_network_range_tensor
from imvec.engines.threads import apply_torch_threads

__all__ = ["ENGINES", "ENV_ENGINE", "InferenceGraph", "check_engine", "check_precision", "optimize"]

ENGINES = ("auto", "fast", "compile", "onnxruntime", "faithful")
ENV_ENGINE = "IMVEC_ENGINE"
# "auto" runs ONNX Runtime on a CPU: it ran every network faster than the fast graph at
# batch 1 and 16 (benchmarks/bench_models.py), except AmoebaNet-A, whose 1.8 GB of weights
# the exporter cannot put in one ONNX protobuf (2 GB limit, slow external-data export).
FAST_FIRST = frozenset({"amoebanet_a"})

def onnxruntime_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnxscript"))


def check_engine(engine: str | None, trainable: bool, network: str | None = None,
                 precision: str = "float32") -> str:
    """The engine a module runs, with a clear error for impossible combinations. ``auto``
    resolves to the one measured fastest for ``network`` (see the module's docstring)."""
    engine = engine or "auto"
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if precision != "float32":
        if trainable:
            raise ValueError(f"precision={precision!r} is for inference (a snapshot of the "
                             "weights, rounded); a trainable module keeps float32 weights. "
                             "For mixed-precision fine-tuning wrap the steps in "
                             "torch.autocast(device_type, dtype=torch.bfloat16).")
        if engine in ("onnxruntime", "faithful"):
            raise ValueError(f"engine={engine!r} runs float32 only; precision={precision!r} "
                             "needs engine='fast' or 'compile' (or 'auto')")
    if trainable and engine not in ("auto", "faithful"):
        raise ValueError(f"engine={engine!r} is an inference engine, built from a snapshot of "
                         "the weights; a trainable module runs the faithful graph. Load with "
                         "trainable=False to use it.")
    if engine != "auto":
        return engine
    if trainable:
        return "faithful"
    chosen = os.environ.get(ENV_ENGINE)
    if chosen:
        if chosen not in ENGINES[1:]:
            raise ValueError(f"${ENV_ENGINE}={chosen!r}; choose one of {', '.join(ENGINES[1:])}")
    else:
        chosen = ("onnxruntime" if network not in FAST_FIRST and onnxruntime_available()
                  else "fast")
    # only the torch graphs run bfloat16 (ONNX Runtime has no CPU kernels for it)
    return chosen if precision == "float32" or chosen in ("fast", "compile") else "fast"


def _build(net: nn.Module, engine: str,
           dtype: torch.dtype = torch.float32) -> Callable[..., torch.Tensor]:
    auto_tune_allocator()  # also spares the onnxruntime engine's inputs fresh page faults
    apply_torch_threads()  # no more threads than CPUs this process may use (threads.py)
    if engine == "onnxruntime":
        from imvec.engines.onnx.runtime import OnnxRuntimeNet

        return OnnxRuntimeNet(net)
    if engine == "compile":
        return compiled(net, dtype)
    return in_precision(fast_network(net), dtype)


_VERSION, _DATA_PTR = operator.attrgetter("_version"), torch.Tensor.data_ptr


class _ForgetTensors:
    """A load_state_dict hook (a class, so that modules still pickle)."""

    def __init__(self, graph: InferenceGraph) -> None:
        self.graph = graph

    def __call__(self, module: nn.Module, incompatible_keys: Any) -> None:
        self.graph._tensors = None  # the stamp then reads the net's tensors again


class InferenceGraph:
    """A module's inference engine, built from the faithful net on first use.

    Not an ``nn.Module`` on purpose: it must not appear in ``state_dict`` or
    ``parameters`` of the module that owns it.
    """

    def __init__(self, net: nn.Module, engine: str = "fast", chosen: bool = False,
                 precision: str = "float32") -> None:
        """``chosen``: the engine was picked by "auto", so where it cannot run (inputs off
        the CPU, a failed export) the fast graph runs instead. ``precision``: the dtype of
        the engine's weights and activations (inputs and outputs stay float32)."""
        self.net, self.engine, self.chosen = net, engine, chosen
        self.precision = precision
        self.dtype = PRECISIONS[precision]
        self._built: Callable[..., torch.Tensor] | None = None
        self._stamp: tuple | None = None
        self._fast: nn.Module | None = None  # end points under the onnxruntime engine
        self._tensors: list[torch.Tensor] | None = None
        # threads making their first calls at once: one builds (exports), the others wait
        self._lock = threading.RLock()
        # load_state_dict(assign=True) puts new tensors in the net, which the stamp of the
        # ones it holds would not see
        net.register_load_state_dict_post_hook(_ForgetTensors(self))

    def __getstate__(self) -> dict[str, Any]:  # built engines hold sessions / compiled code
        state = {**self.__dict__, "_built": None, "_stamp": None, "_fast": None,
                 "_tensors": None}
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def tensors(self) -> list[torch.Tensor]:
        """The net's parameters and the buffers that shape its outputs (kept: listing
        them again costs more than the call of a small network)."""
        if self._tensors is None:  # BN's batch counters do not change the outputs
            self._tensors = [*self.net.parameters(), *(
                t for name, t in self.net.named_buffers()
                if not name.endswith("num_batches_tracked"))]
        return self._tensors

    def _weights_stamp(self) -> tuple[int, int]:
        """Changes when a weight is written in place (its version counter) or replaced
        (its storage): 0.3 ms for NASNet-large's 1808 tensors."""
        tensors = self.tensors()
        return sum(map(_VERSION, tensors)), sum(map(_DATA_PTR, tensors))

    def reset(self) -> None:
        """Forget the built engine (it is rebuilt on the next call)."""
        self._built = self._stamp = self._fast = self._tensors = None

    def get(self, x: torch.Tensor) -> Callable[..., torch.Tensor] | None:
        """The engine for this input, or None where the faithful graph must run: the
        "faithful" engine, or a caller who wants gradients with respect to the images."""
        if self.engine == "faithful" or (torch.is_grad_enabled() and x.requires_grad):
            return None
        return self._current(x.device.type == "cpu" and x.dtype == torch.float32)

    def _current(self, cpu_float32: bool) -> Callable[..., torch.Tensor]:
        stamp = self._weights_stamp()
        with self._lock:
            if stamp != self._stamp:
                self._built, self._fast, self._stamp = None, None, stamp
            if self.chosen and self.engine == "onnxruntime" and not cpu_float32:
                return self._fast_graph()
            if self._built is None:
                self._built = _build(self.net, self.engine, self.dtype)
            return self._built

    def run_nhwc(self, images: np.ndarray, pre_logits: bool,
                 unit_range: bool) -> torch.Tensor | None:
        """``images`` (NHWC float32 in numpy) straight into ONNX Runtime, with no torch op
        on the way: right after a call each costs ~50 us (cold caches), 4% of MobileNet V1
        at batch 16 in all. None where the engine is not ONNX Runtime: the caller then
        takes the general way."""
        if self.engine != "onnxruntime":
            return None
        engine = self._current(cpu_float32=True)
        if engine is not self._built:
            return None
        return self._onnxruntime(engine, images, pre_logits, unit_range)

    def _onnxruntime(self, engine: Any, images: np.ndarray, pre_logits: bool,
                     unit_range: bool) -> torch.Tensor | None:
        """None where the engine failed and the fast graph takes over ("auto" only)."""
        try:  # the export happens on the first call of each size
            return engine.run_nhwc(images, pre_logits, unit_range)
        except Exception as exc:  # noqa: BLE001 (whatever broke, the fast graph runs)
            if not self.chosen:
                raise
            self._give_up(exc)
            return None

    def _give_up(self, exc: Exception) -> nn.Module:
        """An engine picked by "auto" failed (e.g. its export): the fast graph from now on."""
        with self._lock:
            if self.engine == "fast" and self._built is not None:  # another thread gave up
                return self._built
            warnings.warn(f"engine {self.engine!r} failed ({type(exc).__name__}: {exc}); "
                          "running the 'fast' engine instead", RuntimeWarning, stacklevel=4)
            self.engine = "fast"
            self._built = self._fast_graph()
            return self._built

    def _fast_graph(self) -> nn.Module:
        with self._lock:
            if self._fast is None:
                auto_tune_allocator()
                self._fast = fast_network(self.net)
            return self._fast

    def __call__(self, x: torch.Tensor, end_points: dict[str, torch.Tensor] | None = None,
                 pre_logits: bool = False, unit_range: bool = False) -> torch.Tensor:
        """``net``'s output for NCHW ``x`` (and its end points) through the engine; ``x``
        in the network's range, or in [0, 1] with ``unit_range``: ONNX Runtime then scales
        it in its graph, on all its threads (numpy's scaling ran 3x slower right after a
        call, beside ONNX Runtime's spin-waiting threads); other engines get it scaled."""
        engine = self.get(x)
        if engine is not None and end_points is not None and self.engine == "onnxruntime":
            engine = self._fast_graph()  # ORT gives no maps
        onnx = self.engine == "onnxruntime" and engine is not None and engine is self._built
        if unit_range and not onnx:
            x = to_network_range_tensor(x)
        if engine is None:
            features = self.net.forward_features(x, end_points)
            return self.net.forward_head(features, pre_logits=pre_logits)
        if not onnx:
            # no_grad rather than inference_mode: inference tensors could not be saved for
            # backward by a trainable head on top of the features, a common use.
            with torch.no_grad():
                if self.dtype == torch.float32:
                    return engine(x, end_points, pre_logits)
                return self._rounded(engine, x, end_points, pre_logits)
        # ONNX Runtime records no graph: no no_grad (50 us after a call)
        out = self._onnxruntime(engine, x.numpy(force=True).transpose(0, 2, 3, 1), pre_logits,
                                unit_range)
        if out is not None:
            return out
        with torch.no_grad():  # it failed, and "auto" had picked it: the fast graph runs
            return self._built(to_network_range_tensor(x) if unit_range else x, None,
                               pre_logits)

    def _rounded(self, engine: Callable[..., torch.Tensor], x: torch.Tensor,
                 end_points: dict[str, torch.Tensor] | None, pre_logits: bool) -> torch.Tensor:
        """The engine run in ``self.dtype``, answering in ``x``'s dtype."""
        maps: dict[str, torch.Tensor] | None = None if end_points is None else {}
        nhwc = x.permute(0, 2, 3, 1)
        # a module's images lie in NHWC memory: converted as such, in one contiguous pass
        # (3x faster than through the channels_last view)
        rounded = (nhwc.to(self.dtype).permute(0, 3, 1, 2) if nhwc.is_contiguous()
                   else x.to(self.dtype))
        out = engine(rounded, maps, pre_logits).to(x.dtype)
        if maps:
            end_points.update({name: value.to(x.dtype) for name, value in maps.items()})
        return out


def optimize(net: nn.Module, engine: str = "fast") -> nn.Module:
    """The inference version of a plain network from :func:`imvec.create_model`.

    ``optimize(net)(x)`` equals ``net.eval()(x)`` (NCHW in the network's range); the
    result is a new module and ``net`` is not changed. ``engine`` is "fast" or "compile".
    """
    if engine not in ("fast", "compile"):
        raise ValueError(f"optimize() builds the 'fast' or 'compile' engine, got {engine!r}; "
                         "for ONNX Runtime use imvec.engines.onnx.OnnxRuntimeNet(net)")
    auto_tune_allocator()
    return compiled(net) if engine == "compile" else fast_network(net)
