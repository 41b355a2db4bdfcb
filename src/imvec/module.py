"""The TF-Hub module contract around a plain network.

Images ``[B, H, W, 3]`` float32 in [0, 1] go in; the module scales them to the network's
[-1, 1] exactly as the hub graphs do (``images * 2 - 1``) and returns ``[B, num_features]``
(or ``[B, 1001]`` logits for classification modules), with TF-Hub's signatures, tags and
introspection.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from imvec.engines.graph import InferenceGraph, check_engine, check_precision
from imvec.engines.scaling import (
    in_numpy,
    surely_in_unit_range,
    to_network_range,
    to_network_range_tensor,
)
from imvec.errors import InputError
from imvec.nets.mobilenet_v1 import MIN_INPUT_SIZE
from imvec.nets.ops import BatchNorm
from imvec.registry import Card
from imvec.weights.mapping import variable_map

__all__ = ["DEFAULT_BN_MOMENTUM", "Module", "TensorInfo", "get_expected_image_size",
           "to_network_range"]

DEFAULT_BN_MOMENTUM = 0.99  # TF decay; the v3 cards' default for fine-tuning
RANGE_TOLERANCE = 1e-4  # resampling may overshoot [0, 1] by rounding; more is an error


@dataclass(frozen=True)
class TensorInfo:
    """dtype and static shape of a signature input or output (None = any size)."""

    dtype: torch.dtype
    shape: tuple[int | None, ...]

    def get_shape(self) -> tuple[int | None, ...]:
        return self.shape

    def __repr__(self) -> str:
        dims = ", ".join("None" if d is None else str(d) for d in self.shape)
        return f"{str(self.dtype).removeprefix('torch.')} [{dims}]"


class Module(nn.Module):
    """A TF-Hub image module: a network, its card, and TF-Hub's calling conventions.

    ``trainable=False``: parameters are frozen and the network stays in inference mode,
    whatever ``.train()`` says. ``trainable=True``: parameters get gradients; BN keeps
    using its moving statistics unless ``tags={"train"}`` selects the training graph
    (batch statistics, moving averages updated with ``batch_norm_momentum``, dropout and
    drop path active), which then follows ``.train()`` / ``.eval()``.
    """

    def __init__(
        self,
        net: nn.Module,
        card: Card,
        *,
        trainable: bool = False,
        tags: set[str] | None = None,
        batch_norm_momentum: float | None = None,
        source: str | None = None,
        hparams: dict[str, Any] | None = None,
        class_names: list[str] | None = None,
        engine: str | None = None,
        precision: str | None = None,
    ) -> None:
        super().__init__()
        tags = set(tags or ())
        if tags - {"train"}:
            raise ValueError(f"unknown tags {sorted(tags - {'train'})}; a module has the "
                             "inference graph (tags=None) and the training graph "
                             "(tags={'train'})")
        if tags and not trainable:
            raise ValueError("tags={'train'} selects the training graph, which updates the "
                             "batch-norm moving averages; it needs trainable=True. For "
                             "inference use tags=None (the default).")
        self.net, self.card, self.source = net, card, source or card.handle
        self.hparams = {**card.hparams, **(hparams or {})}
        self.trainable, self.tags = trainable, frozenset(tags)
        self.batch_norm_momentum = DEFAULT_BN_MOMENTUM
        self.set_batch_norm_momentum(DEFAULT_BN_MOMENTUM if batch_norm_momentum is None
                                     else batch_norm_momentum)
        self._momentum_noted = False
        if batch_norm_momentum is not None:
            self._note_momentum_unused()
        self.requires_grad_(trainable)
        self.train("train" in self.tags)
        self._output_shapes: dict[str, tuple[int | None, ...]] | None = None
        # inference engine (imvec.engines): a separate graph built from self.net on use
        precision = check_precision(precision)
        resolved = check_engine(engine, trainable, card.network, precision)
        self._inference = None if resolved == "faithful" else InferenceGraph(
            net, resolved, chosen=engine in (None, "auto"), precision=precision)
        if class_names is not None and len(class_names) != card.num_classes:
            raise ValueError(f"{len(class_names)} class names for {card.num_classes} classes")
        self._class_names = list(class_names) if class_names is not None else None

    @property
    def engine(self) -> str:
        """How this module runs: "faithful", or its inference engine (imvec.engines)."""
        return "faithful" if self._inference is None else self._inference.engine

    @property
    def precision(self) -> str:
        """The dtype the module computes in: "float32", or "bfloat16" for an inference
        engine loaded with ``precision="bfloat16"``. Images and outputs are float32."""
        return "float32" if self._inference is None else self._inference.precision

    def rebuild_engine(self) -> None:
        """Drop the built inference engine: the next call builds it from the current
        weights. Only writes that autograd's version counters miss need this (through
        ``parameter.data``, or into a numpy view of a weight); in-place torch ops,
        ``load_state_dict`` and ``.to()`` are noticed on their own."""
        if self._inference is not None:
            self._inference.reset()

    # -- modes -------------------------------------------------------------------------
    def _apply(self, fn: Any, recurse: bool = True) -> Module:
        if getattr(self, "_inference", None) is not None:  # .to()/.half(): rebuild on use
            self._inference.reset()
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> Module:
        self.training = mode
        self.net.train(mode and "train" in self.tags)
        return self

    def requires_grad_(self, requires_grad: bool = True) -> Module:
        if requires_grad and not self.trainable:
            raise ValueError("this module was loaded with trainable=False; load it with "
                             "trainable=True to fine-tune it")
        self.net.requires_grad_(requires_grad)
        return self

    def set_batch_norm_momentum(self, momentum: float) -> None:
        """TF decay of the BN moving averages in the training graph (0.99 by default)."""
        momentum = check_momentum(momentum)
        self.batch_norm_momentum = momentum
        for module in self.net.modules():
            if isinstance(module, BatchNorm):
                module.decay = momentum

    def _note_momentum_unused(self) -> None:
        """A momentum only moves the averages of the training graph. TF-Hub accepts it in
        the inference graph too and ignores it there, so ported code that always passes it
        keeps working: a warning (once per module), not an error."""
        if "train" in self.tags or getattr(self, "_momentum_noted", False):
            return
        self._momentum_noted = True
        warnings.warn("batch_norm_momentum has no effect here: only the training graph "
                      "updates the batch-norm moving averages; load with trainable=True, "
                      "tags={'train'} for it to apply", UserWarning, stacklevel=4)

    @contextmanager
    def _momentum(self, momentum: Any) -> Iterator[None]:
        if momentum is None:
            yield
            return
        saved = self.batch_norm_momentum
        self.set_batch_norm_momentum(momentum)
        try:
            yield
        finally:
            self.set_batch_norm_momentum(saved)

    # -- signatures --------------------------------------------------------------------
    def get_signature_names(self) -> list[str]:
        return list(self.card.signatures)

    def _signature(self, signature: str | None) -> str:
        signature = signature or "default"
        if signature not in self.card.signatures:
            raise ValueError(f"{self.card.handle} has no signature {signature!r}; "
                             f"it has {', '.join(self.card.signatures)}")
        return signature

    def get_input_info_dict(self, signature: str | None = None) -> dict[str, TensorInfo]:
        signature = self._signature(signature)
        h, w = (None, None) if self.card.variable_input_size else self.card.input_size
        info = {"images": TensorInfo(torch.float32, (None, h, w, 3))}
        if signature.endswith("_with_bn_hparams"):
            info["batch_norm_momentum"] = TensorInfo(torch.float32, ())
        return info

    def get_output_info_dict(self, signature: str | None = None) -> dict[str, TensorInfo]:
        signature = self._signature(signature)
        if self._output_shapes is None:
            self._output_shapes = self._trace_output_shapes()
        shapes = dict(self._output_shapes)
        if self._returns_logits(signature):
            shapes["default"] = (None, self.card.num_classes)
        return {k: TensorInfo(torch.float32, s) for k, s in shapes.items()}

    def _returns_logits(self, signature: str) -> bool:
        """``image_classification*`` (and ``default`` of a classifier) give logits; the
        ``image_feature_vector*`` signatures give features, for classifiers too."""
        if signature == "default":
            return self.card.variant == "classification"
        return signature.startswith("image_classification")

    def _trace_output_shapes(self) -> dict[str, tuple[int | None, ...]]:
        """Output shapes from a forward pass of a twin network on the meta device."""
        with torch.device("meta"):
            twin = self.card.build(**self.hparams)
            h, w = self.card.input_size
            end_points: dict[str, torch.Tensor] = {}
            twin.forward_features(torch.empty(1, 3, h, w), end_points)
        shapes = {"default": (None, twin.num_features)}
        for name, value in end_points.items():
            spatial = (None, None) if self.card.variable_input_size else tuple(value.shape[2:])
            shapes[name] = (None, *spatial, value.shape[1])
        return shapes

    # -- calling -----------------------------------------------------------------------
    @property
    def num_features(self) -> int:
        return self.net.num_features

    @property
    def class_names(self) -> list[str] | None:
        """Names of the logits (fine-tuned: from the file; TF-Hub classifiers: the 1001
        ImageNet labels); None for feature-vector modules."""
        if self._class_names is None and self.card.variant == "classification" \
                and self.card.num_classes == 1001:
            from imvec.labels import imagenet_labels

            return imagenet_labels()
        return self._class_names

    @property
    def variable_map(self) -> dict[str, torch.Tensor]:
        """``{TF variable name: live tensor in TF layout}`` (conv HWIO, depthwise
        [k, k, C, 1], dense [in, out]), moving statistics included."""
        return variable_map(self.net)


    def forward(
        self, inputs: Any = None, signature: str | None = None, as_dict: bool = False, **kwargs: Any
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """``module(images)``, ``module(dict(images=...), signature=..., as_dict=True)`` or
        ``module(inputs=dict(images=..., batch_norm_momentum=0.997),
        signature="image_feature_vector_with_bn_hparams")``."""
        signature = self._signature(signature)
        images, momentum = self._unpack(inputs, signature, kwargs)
        if momentum is not None:  # checked even where it has no effect: NaN is a bug
            check_momentum(momentum)
            self._note_momentum_unused()
        x, array = self._check_images(images)
        if array is not None and self._inference is not None and not as_dict:
            out = self._inference.run_nhwc(array, not self._returns_logits(signature), True)
            if out is not None:
                return out
        return self._run(x.permute(0, 3, 1, 2), signature, momentum, as_dict, unit_range=True)

    def forward_scaled(self, images: torch.Tensor) -> torch.Tensor:
        """The default signature's output for images already checked and scaled:
        ``[B, H, W, 3]`` float32 in the network's range, i.e. ``to_network_range`` of
        valid images, on the module's device. Nothing is checked: this is for pipelines
        that decode and scale in worker processes (``imvec extract``); use ``module(images)``
        otherwise."""
        signature = self._signature(None)
        if self._inference is not None and in_numpy(images):
            out = self._inference.run_nhwc(images.numpy(), not self._returns_logits(signature),
                                           False)
            if out is not None:
                return out
        return self._run(images.permute(0, 3, 1, 2), signature, None, False)

    def _run(self, x: torch.Tensor, signature: str, momentum: Any, as_dict: bool,
             unit_range: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
        end_points: dict[str, torch.Tensor] | None = {} if as_dict else None
        if self._inference is not None:  # trainable=False: the engine, not the faithful graph
            out = self._inference(x, end_points, not self._returns_logits(signature),
                                  unit_range)  # ONNX Runtime scales in its graph
        else:
            if unit_range:
                x = to_network_range_tensor(x)
            with self._momentum(momentum):
                features = self.net.forward_features(x, end_points)
                out = self.net.forward_head(features,
                                            pre_logits=not self._returns_logits(signature))
        if not as_dict:
            return out
        maps = {k: v.permute(0, 2, 3, 1) for k, v in end_points.items()}
        return {"default": out, **maps}

    def _unpack(self, inputs: Any, signature: str, kwargs: dict) -> tuple[Any, Any]:
        if kwargs:
            if inputs is not None:
                raise TypeError("pass the inputs either as one argument or as keywords, not both")
            inputs = kwargs
        if not isinstance(inputs, dict):
            return inputs, None
        allowed = set(self.get_input_info_dict(signature))
        unknown = set(inputs) - allowed
        if unknown or "images" not in inputs:
            raise InputError(f"signature {signature!r} takes inputs {sorted(allowed)}; got "
                             f"{sorted(inputs)}")
        return inputs["images"], inputs.get("batch_norm_momentum")

    def _check_images(self, images: Any) -> tuple[torch.Tensor, np.ndarray | None]:
        """The images as a tensor on the weights' device and dtype, and as a numpy array
        where they are float32 on the CPU (``in_numpy``), checked."""
        h, w = self.card.input_size
        contract = f"images [B,H,W,3] (NHWC, RGB), float32 in [0, 1], e.g. [8,{h},{w},3]"
        if isinstance(images, np.ndarray):
            if not (np.issubdtype(images.dtype, np.floating) or images.dtype == np.bool_):
                raise InputError(f"{contract}; got dtype {images.dtype}. Convert with "
                                 "images.astype('float32') / 255 for 8-bit images.")
            images = torch.from_numpy(np.ascontiguousarray(images))
        elif not isinstance(images, torch.Tensor):
            raise InputError(f"{contract}; got {type(images).__name__}")
        if not images.is_floating_point():
            raise InputError(f"{contract}; got dtype {images.dtype}. Convert with "
                             "images.float() / 255 for 8-bit images.")
        shape = tuple(images.shape)
        if images.dim() != 4 or shape[-1] != 3:
            hint = ""
            if images.dim() == 4 and shape[1] == 3:
                hint = " This looks like NCHW; pass images.permute(0, 2, 3, 1)."
            elif images.dim() == 3 and shape[-1] == 3:
                hint = " Add a batch dimension: images[None]."
            raise InputError(f"{contract}; got shape {list(shape)}.{hint}")
        size = shape[1:3]
        if self.card.variable_input_size:
            if min(size) < MIN_INPUT_SIZE:
                raise InputError(f"{self.card.handle} accepts images of at least "
                                 f"{MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} (default {h}x{w}); "
                                 f"got {size[0]}x{size[1]}")
        elif size != (h, w):
            raise InputError(f"{self.card.handle} expects {h}x{w} images; got "
                             f"{size[0]}x{size[1]} (shape {list(shape)}). Resize them to "
                             f"{h}x{w} first.")
        like = (next(self.net.parameters()) if self._inference is None
                else self._inference.tensors()[0])
        x = images if images.dtype == like.dtype and images.device == like.device else (
            images.to(device=like.device, dtype=like.dtype))
        array = x.numpy() if in_numpy(x) else None
        if x.numel() and not (array is not None and surely_in_unit_range(array, RANGE_TOLERANCE)):
            if array is not None:
                lo, hi = float(array.min()), float(array.max())
            else:
                lo, hi = (float(v) for v in torch.aminmax(x))
            if not (lo >= -RANGE_TOLERANCE and hi <= 1 + RANGE_TOLERANCE):
                raise InputError(f"{contract}; got values in [{lo:.4g}, {hi:.4g}]. Scale "
                                 "8-bit images by 1/255; undo any mean/std normalization.")
        return x, array


def check_momentum(momentum: Any) -> float:
    """``momentum`` as a float, or a ValueError: a TF decay in [0, 1], finite."""
    try:
        # no torch.as_tensor: under a `with torch.device("meta")` block it makes a meta tensor
        value = float(momentum.item() if isinstance(momentum, torch.Tensor) else momentum)
    except (TypeError, ValueError, RuntimeError):
        value = float("nan")
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"batch_norm_momentum must be a number in [0, 1] (a TF decay such "
                         f"as 0.99 or 0.997), got {momentum!r}")
    return value


def get_expected_image_size(module: Module | Card | str) -> tuple[int, int]:
    """(height, width) the module expects (its default size, if it accepts others)."""
    if isinstance(module, str):
        from imvec.registry import find_card

        module = find_card(module)
    card = module.card if isinstance(module, Module) else module
    return card.input_size
