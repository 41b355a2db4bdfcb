"""The Ray Data engine: the same job spread over a Ray cluster.

Ray tasks decode and resize (``map_batches`` over the image list), a pool of actors holds
the model, one per GPU when the cluster has GPUs, and the driver streams the results into
the same work folder as the local engine (same parts, same commits, same resume rule), from
which the same Parquet file is assembled. Only the images must be readable by the workers
(a shared or network file system); the model travels through Ray's object store and the
output stays on the driver.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from imvec.data.preprocess import Preprocessing
from imvec.data.sources import Item
from imvec.errors import ImvecError
from imvec.extract.pool import decode_into
from imvec.extract.workdir import WorkDir
from imvec.module import Module

__all__ = ["run_ray"]

DECODE_BATCH = 16


def _decode(batch: dict, preprocessing: Preprocessing) -> dict:
    """Ray task: ids and paths in, images in the network's range (zeros where decoding
    failed) and reasons out."""
    items = [Item(str(i), str(p)) for i, p in zip(batch["id"], batch["path"], strict=True)]
    images = np.zeros((len(items), *preprocessing.size, 3), np.float32)
    errors = decode_into(preprocessing, items, images)
    return {"id": batch["id"], "path": batch["path"], "image": images,
            "error": np.array([e or "" for e in errors], dtype=object)}


class _Embedder:
    """Ray actor: holds the model (on a GPU when it has one), embeds decoded images."""

    def __init__(self, module_ref: list, dim: int) -> None:
        import ray
        import torch

        self.module, self.dim = ray.get(module_ref[0]), dim
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.module.to(self.device)

    def __call__(self, batch: dict) -> dict:
        import torch

        ok = np.array([not e for e in batch["error"]], bool)
        features = np.zeros((len(ok), self.dim), np.float32)
        if ok.any():
            with torch.inference_mode():
                images = torch.from_numpy(np.ascontiguousarray(batch["image"][ok]))
                features[ok] = self.module.forward_scaled(
                    images.to(self.device)).float().cpu().numpy()
        return {"id": batch["id"], "path": batch["path"], "feature": features,
                "error": batch["error"]}


def _blocks(todo: Sequence[Item], replicas: int) -> list:
    """The image list as Arrow tables: enough blocks to keep every replica busy, each small
    enough that a retried task redoes little."""
    import pyarrow as pa

    table = pa.table({"id": [i.id for i in todo], "path": [i.path for i in todo]})
    count = int(np.clip(len(todo) // 64, 2 * replicas, 10_000))
    size = -(-len(todo) // max(1, min(count, len(todo))))
    return [table.slice(start, size) for start in range(0, len(todo), size)]


def run_ray(module: Module, todo: Sequence[Item], work: WorkDir, preprocessing: Preprocessing,
            batch_size: int, address: str | None, actors: int | None,
            progress: Callable[[int], None]) -> None:
    """Compute ``todo`` on Ray into ``work``; starts a local Ray unless one is running or
    ``address`` names a cluster."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ImvecError("the Ray engine needs Ray Data: pip install 'imvec[ray]'") from exc
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # rows arrive in listing order
        context.enable_progress_bars = False  # the driver's bar counts committed images
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        # GPUs: one actor per GPU, decoding in CPU tasks beside them. CPUs only: one actor
        # per CPU, which Ray fuses with the decoding (each core decodes, then embeds).
        replicas = actors or max(gpus or int(resources.get("CPU", 1)), 1)
        module_ref = ray.put(module.cpu())
        dataset = ray.data.from_arrow(_blocks(todo, replicas))
        decoded = dataset.map_batches(_decode, batch_size=DECODE_BATCH, batch_format="numpy",
                                      fn_kwargs={"preprocessing": preprocessing}, num_cpus=1)
        embedded = decoded.map_batches(
            _Embedder, batch_size=batch_size, batch_format="numpy",
            fn_constructor_kwargs={"module_ref": [module_ref], "dim": work.dim},
            compute=ray.data.ActorPoolStrategy(size=replicas),
            num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1)
        for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
            errors = [str(e) or None for e in batch["error"]]
            work.add([str(i) for i in batch["id"]], [str(p) for p in batch["path"]],
                     batch["feature"], errors)
            progress(len(errors))
    finally:
        if started:
            ray.shutdown()
