"""What an extraction job is (inputs, model, output, preprocessing, engine, runner) and what
it did."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from imvec.data.decode import DEFAULT_DECODE_TIMEOUT, DEFAULT_MAX_PIXELS
from imvec.engines import ENGINES

if TYPE_CHECKING:
    from imvec.module import Module

__all__ = ["DEFAULT_BATCH_SIZES", "DEFAULT_ENGINE", "FORMATS", "RUNNERS", "ExtractJob",
           "ExtractResult", "default_batch_size"]

FORMATS = ("parquet", "npy")
# Where the job runs: worker processes here, or a Ray cluster. Formerly ``engine``, which
# now names the inference engine, as in imvec.load.
RUNNERS = ("local", "ray")
# The inference engine of a model loaded by name or path when none is asked for: beside the
# decoding workers ONNX Runtime gained nothing end to end and costs an export on first use
# (benchmarks/results/extract.json).
DEFAULT_ENGINE = "fast"
# Images per forward pass on a CPU, the fastest measured (benchmarks/results/extract.json,
# large_networks.json); AmoebaNet stays small for its activations' memory.
DEFAULT_BATCH_SIZES = {"mobilenet_v1": 64, "nasnet_mobile": 32, "nasnet_large": 8,
                       "pnasnet_large": 8, "amoebanet_a": 2}


def default_batch_size(network: str, device: str = "cpu") -> int:
    if device.startswith("cuda"):
        return 64
    return DEFAULT_BATCH_SIZES.get(network, 8)


@dataclass(frozen=True)
class ExtractJob:
    """One ``imvec extract`` run.

    ``model``: anything :func:`imvec.load` accepts, or a loaded :class:`imvec.Module`.
    ``output``: ``.parquet`` (or ``.npy`` with ``format="npy"``; the suffix decides when
    ``format`` is None). ``size``: input size for variable-size modules (default: the card's).
    ``crop``: central fraction kept before resizing (``0.875`` = Inception style).
    ``commit_every``: images per committed part; a crash loses at most that much work.
    ``runner``: "local" (worker processes here) or "ray" (a Ray cluster; ``address`` names
    it, ``actors`` sets the model replicas).
    ``engine``: the inference engine, as :func:`imvec.load` takes it; None:
    :data:`DEFAULT_ENGINE` ("fast"), or ``$IMVEC_ENGINE`` where set. A loaded ``model``
    keeps its own. Ray actors run the same engine (the module travels with it).
    ``precision``: "bfloat16" runs the model in bfloat16 (see :mod:`imvec.engines`); its
    vectors are recorded as such, and a resumed run must use the same precision.
    ``decode_timeout``: seconds one image may take to decode (None: no limit); a worker
    stuck past it is replaced and the image reported (local runner).
    ``accept_truncated``: use JPEGs whose data is cut short or corrupt (gray where missing)
    instead of reporting them; recorded, so a resume must use the same setting.
    ``verify_inputs``: besides size and mtime, record a digest of each input file's bytes
    and, on a rerun, recompute the images whose digest changed.
    ``shard_size``: images per shard of an output folder (``output`` without a suffix).
    ``relist``: list the inputs again and add new images to an output folder as new shards.
    """

    inputs: tuple[str, ...]
    model: str | os.PathLike | Module
    output: str | os.PathLike
    format: str | None = None
    batch_size: int | None = None
    workers: int | None = None
    size: int | None = None
    crop: float | None = None
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    path_column: str = "path"
    runner: str = "local"
    address: str | None = None
    actors: int | None = None
    device: str | None = None
    overwrite: bool = False
    progress: bool = True
    commit_every: int = 1024
    engine: str | None = None
    precision: str | None = None
    decode_timeout: float | None = DEFAULT_DECODE_TIMEOUT
    accept_truncated: bool = False
    verify_inputs: bool = False
    shard_size: int = 10_000
    relist: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.inputs, str | os.PathLike):
            object.__setattr__(self, "inputs", (os.fspath(self.inputs),))
        object.__setattr__(self, "inputs", tuple(os.fspath(i) for i in self.inputs))
        suffix = Path(self.output).suffix.lower()
        fmt = self.format or ("npy" if suffix == ".npy" else "parquet")
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")
        if suffix in (".npy", ".parquet") and suffix != f".{fmt}":
            raise ValueError(f"output {self.output} ends in {suffix} but the format is {fmt}; "
                             f"name it *.{fmt} or drop --format")
        object.__setattr__(self, "format", fmt)
        if self.engine in RUNNERS:
            self._runner_from_old_engine()
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {', '.join(RUNNERS)}; got {self.runner!r}")
        if self.engine is not None and self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)} (the inference "
                             f"engine; where the job runs is runner=); got {self.engine!r}")
        for name in ("batch_size", "workers", "size", "actors"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1; got {value}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be at least 1; got {self.shard_size}")
        if self.commit_every < 1:
            raise ValueError(f"commit_every must be at least 1; got {self.commit_every}")
        if self.decode_timeout is not None and not self.decode_timeout > 0:
            raise ValueError(f"decode_timeout must be a positive number of seconds (or None "
                             f"for no limit); got {self.decode_timeout}")
        if self.crop is not None and not 0.0 < self.crop <= 1.0:
            raise ValueError(f"crop must be a fraction in (0, 1], e.g. 0.875; got {self.crop}")
        if self.address is not None and self.runner != "ray":
            raise ValueError("address names a Ray cluster; use it with runner='ray'")

    def _runner_from_old_engine(self) -> None:
        """``engine="local"/"ray"``, the spelling before ``runner``: still works, with a note."""
        if self.runner not in ("local", self.engine):  # "local" is the default: not a choice
            raise ValueError(f"engine={self.engine!r} (the old spelling of runner=) "
                             f"contradicts runner={self.runner!r}; pass runner= only")
        warnings.warn(f"ExtractJob(engine={self.engine!r}) is deprecated and will be removed; "
                      f"use runner={self.engine!r} (engine= now picks the inference engine)",
                      DeprecationWarning, stacklevel=4)
        object.__setattr__(self, "runner", self.engine)
        object.__setattr__(self, "engine", None)


@dataclass
class ExtractResult:
    """What a run did. ``ok + failed == total``; ``computed`` of them in this run."""

    output: Path | str  # str: a URL
    errors: Path | str
    total: int
    ok: int
    failed: int
    computed: int
    seconds: float
    resumed: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """The one line the CLI prints at the end."""
        failed = f", {self.failed} failed -> {self.errors}" if self.failed else ", 0 failed"
        line = f"{self.total} images -> {self.output} ({self.ok} ok{failed})"
        if self.computed:
            line += (f"; {self.computed} computed in {self.seconds:.1f} s "
                     f"({self.images_per_second:.1f} images/s)")
        done_before = self.total - self.computed
        if done_before:
            line += f"; {done_before} done by an earlier run"
        return line
