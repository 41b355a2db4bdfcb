"""imvec: the classic TF-Hub ImageNet feature-vector networks as faithful PyTorch modules."""

from imvec._system import openmp_sleeps_when_idle

openmp_sleeps_when_idle()  # before anything loads torch (engines/threads.py)

from imvec._version import __version__  # noqa: E402
from imvec.errors import (  # noqa: E402
    CheckpointError,
    CheckpointMismatchError,
    ChecksumError,
    ImvecError,
    InputError,
    UnknownHandleError,
)
from imvec.loader import create_model, load  # noqa: E402
from imvec.module import Module, TensorInfo, get_expected_image_size  # noqa: E402
from imvec.registry import Card, list_models  # noqa: E402

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
    "preprocess",
    "read_features",
]


def __getattr__(name: str):
    if name == "read_features":  # imported on first use: reading results needs pyarrow
        from imvec.extract import read_features

        return read_features
    if name == "preprocess":  # imported on first use: keeps `import imvec` light
        from imvec.data.preprocess import preprocess

        return preprocess
    raise AttributeError(f"module 'imvec' has no attribute {name!r}")
