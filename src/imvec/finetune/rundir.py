"""The run directory: what a run leaves behind, and whether it may continue.

``RUN_DIR/config.json`` (the resolved job), ``checkpoint.pt`` (after every epoch),
``metrics.csv`` / ``metrics.json`` / ``metrics.png``, ``cache/`` (head-mode features),
``skipped_images.txt`` (if any image could not be decoded) and, at the end,
``model.safetensors``. An existing run is never overwritten: it is resumed with
``resume=True`` (and the same job), or the new run goes elsewhere. A run that never
completed an epoch (no checkpoint: its start failed or was cut short) is no run: any job
may start afresh there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from imvec.finetune.config import FinetuneConfig
from imvec.finetune.state import atomic_write_text, load_checkpoint

__all__ = ["CHECKPOINT", "CONFIG", "MODEL", "open_run", "record_job"]

CONFIG, CHECKPOINT, MODEL = "config.json", "checkpoint.pt", "model.safetensors"


def open_run(config: FinetuneConfig) -> dict[str, Any] | None:
    """Check ``config.output`` against ``config``; the checkpoint to resume from, if any."""
    run_dir = Path(config.output)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"{run_dir} exists and is not a directory; choose another -o")
    saved_config = run_dir / CONFIG
    started = (run_dir / CHECKPOINT).is_file() or (run_dir / MODEL).is_file()
    if saved_config.is_file() and started:
        if not config.resume:
            raise ValueError(f"{run_dir} already holds a run; continue it with --resume (same "
                             "options), or choose a new -o")
        try:
            saved = json.loads(saved_config.read_text())
        except ValueError as exc:
            raise ValueError(f"{saved_config} is damaged ({exc}); restore it, or choose a new "
                             "-o") from None
        changed = config.differences(saved)
        if changed:
            raise ValueError(f"--resume with other options than the run in {run_dir}: "
                             + "; ".join(changed))
    elif (not saved_config.is_file() and run_dir.is_dir()
          and any(p.name != "cache" for p in run_dir.iterdir())):
        raise ValueError(f"{run_dir} is not empty and holds no imvec run; choose a new or "
                         "empty -o")
    checkpoint = run_dir / CHECKPOINT
    return load_checkpoint(checkpoint) if config.resume and checkpoint.is_file() else None


def record_job(config: FinetuneConfig) -> None:
    """Write ``config.json`` for a run that has not completed an epoch yet (one process,
    once the job has started: data read, model loaded)."""
    run_dir = Path(config.output)
    if not (run_dir / CHECKPOINT).is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / CONFIG, json.dumps(config.to_dict(), indent=2) + "\n")
