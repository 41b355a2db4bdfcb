"""Where imvec keeps its files: ``$IMVEC_HOME`` (default ``~/.cache/imvec``)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ENV_HOME", "home"]

ENV_HOME = "IMVEC_HOME"


def home() -> Path:
    """``$IMVEC_HOME`` (default ``~/.cache/imvec``)."""
    return Path(os.environ.get(ENV_HOME) or Path.home() / ".cache" / "imvec").expanduser()
