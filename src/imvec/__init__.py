"""imvec: the classic TF-Hub ImageNet feature-vector networks as faithful PyTorch modules."""

from imvec._version import __version__
from imvec.errors import (
    CheckpointError,
    CheckpointMismatchError,
    ChecksumError,
    ImvecError,
    InputError,
    UnknownHandleError,
)
from imvec.loader import create_model, load
from imvec.module import Module, TensorInfo, get_expected_image_size
from imvec.registry import Card, list_models

__all__ = [
    "__version__",
    "Card",
    "CheckpointError",
    "CheckpointMismatchError",
    "ChecksumError",
    "ImvecError",
    "InputError",
    "Module",
    "TensorInfo",
    "UnknownHandleError",
    "create_model",
    "get_expected_image_size",
    "list_models",
    "load",
    "read_features",
]


def __getattr__(name: str):
    if name == "read_features":  # imported on first use: reading results needs pyarrow
        from imvec.extract import read_features

        return read_features
    raise AttributeError(f"module 'imvec' has no attribute {name!r}")
