"""The hub modules' input scaling: images in [0, 1] to the networks' [-1, 1].

One definition for the module, its inference engines and the extraction workers, so all
of them feed a network bit-identical inputs (``images * 2 - 1`` in float32, as the hub
graphs compute it).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["in_numpy", "surely_in_unit_range", "to_network_range", "to_network_range_tensor"]


def to_network_range(images: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``images * 2 - 1`` in float32 (in place into ``out`` when given)."""
    out = np.multiply(images, np.float32(2.0), out=out, dtype=np.float32)
    out -= np.float32(1.0)
    return out


def in_numpy(x: torch.Tensor) -> bool:
    """Whether ``x`` is checked and scaled with numpy (the same float32 operations) on one
    thread: on the CPU, waking torch's thread pool there would fight ONNX Runtime's
    spinning threads over the cores (it cost MobileNet 3.5 ms of a 5 ms call at batch 1)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad


def to_network_range_tensor(x: torch.Tensor) -> torch.Tensor:
    """``to_network_range`` of a tensor, keeping its layout (numpy where ``in_numpy``)."""
    return torch.from_numpy(to_network_range(x.numpy())) if in_numpy(x) else x * 2.0 - 1.0


def surely_in_unit_range(images: np.ndarray, tolerance: float) -> bool:
    """True when every float32 value lies in [0, 1 + tolerance], in one pass: the bits of
    non-negative floats order as the values do, and a sign bit, NaN or inf reads as a
    larger integer. False only means that the exact check (min and max: two passes)
    must decide, e.g. for -0.0 or small negative overshoots."""
    bound = np.array(1 + tolerance, np.float32).view(np.uint32)
    return images.dtype == np.float32 and bool(images.view(np.uint32).max() <= bound)
