"""Errors users see. Each one also inherits the builtin a caller would catch."""

from __future__ import annotations


class ImvecError(Exception):
    """Base class of every error imvec raises on purpose."""


class UnknownHandleError(ImvecError, ValueError):
    """A handle, URL or short name that the registry does not know."""


class InputError(ImvecError, ValueError):
    """Images that break the module's input contract (shape, dtype, range, size)."""


class CheckpointError(ImvecError, ValueError):
    """A TF checkpoint that is missing, truncated or corrupt."""


class CheckpointMismatchError(ImvecError, ValueError):
    """A checkpoint whose tensors do not fit the network (unmapped or missing names, shapes)."""


class ChecksumError(ImvecError, ValueError):
    """A file whose sha256 differs from the one pinned for it."""


class DeviceError(ImvecError, ValueError):
    """A device that does not exist or that this machine or PyTorch build cannot use."""


def summarize_names(names: list[str] | set[str], limit: int = 10) -> str:
    """Sorted names, the first `limit` of them plus a count of the rest."""
    ordered = sorted(names)
    shown = ", ".join(ordered[:limit])
    rest = len(ordered) - limit
    return f"{shown} (+{rest} more)" if rest > 0 else shown
