"""The Ray engine: the same job spread over a Ray cluster, two ways.

To an output folder (:func:`run_shards_ray`): the driver hands out shard numbers; each
actor reads its shard's part of the manifest, decodes (threads), embeds and writes the
shard and its done marker itself, with the local engine's per-shard code. Nothing per image
passes the driver; a lost node costs its shards in flight, which go to another actor.
The output folder must be reachable from every node (shared, or a URL prefix).

To a single ``.parquet`` file (:func:`run_ray`, for small jobs): Ray tasks decode and
resize (``map_batches`` over the image list), a pool of actors holds the model, one per GPU
when the cluster has GPUs, and the driver streams the results into the same work folder as
the local engine, from which the same Parquet file is assembled.

Either way the images must be readable by the workers (a shared file system or URLs), and
the model travels through Ray's object store, with its inference engine (the actors run
the engine the job chose).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from imvec.data.preprocess import Preprocessing
from imvec.data.sources import Item
from imvec.engines.threads import user_threads
from imvec.errors import ImvecError
from imvec.extract.pool import Batch, decode_into
from imvec.extract.workdir import WorkDir
from imvec.module import Module

__all__ = ["RayShardStats", "ShardWorker", "actor_threads", "dataset_shard", "run_ray",
           "run_ray_shards", "run_shards_ray"]

DECODE_BATCH = 16


def _decode(batch: dict, preprocessing: Preprocessing) -> dict:
    """Ray task: ids and paths in, images in the network's range (zeros where decoding
    failed) and reasons out."""
    with contextlib.suppress(ImportError, AttributeError):
        import cv2

        cv2.setNumThreads(1)  # a task holds one CPU; OpenCV would start one thread per core
    items = [Item(i, p) for i, p in zip(_names(batch["id"]), _names(batch["path"]),
                                        strict=True)]
    images = np.zeros((len(items), *preprocessing.size, 3), np.float32)
    errors = decode_into(preprocessing, items, images)
    return {"id": batch["id"], "path": batch["path"], "image": images,
            "error": np.array([e or "" for e in errors], dtype=object)}


class _Embedder:
    """Ray actor: holds the model (on a GPU when it has one), embeds decoded images."""

    def __init__(self, module_ref: list, dim: int, threads: int) -> None:
        import ray
        import torch

        # the actor's share of its node's CPUs: torch would start one thread per core in
        # every actor, and N actors x N threads wait on each other (engines/threads.py)
        torch.set_num_threads(threads)
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


def actor_threads(cpus: int, replicas: int, gpus: int) -> int:
    """Torch threads per actor: the user's choice ($IMVEC_THREADS, ...), else the cluster's
    CPUs shared out among the replicas (one each in the default one-actor-per-CPU case);
    an actor feeding a GPU needs one."""
    return user_threads() or (1 if gpus else max(1, cpus // max(1, replicas)))


def _names(values: Iterable) -> list[str]:
    """Ids or paths from a batch's column of exact bytes (:func:`arrow.raw`)."""
    return [v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else str(v)
            for v in values]


def _blocks(todo: Sequence[Item], replicas: int) -> list:
    """The image list as Arrow tables: enough blocks to keep every replica busy, each small
    enough that a retried task redoes little. Names as exact bytes: a name that is not
    UTF-8 (a str with lone surrogates) is no valid Arrow string."""
    import pyarrow as pa

    from imvec.extract.arrow import raw

    table = pa.table({"id": raw([i.id for i in todo]), "path": raw([i.path for i in todo])})
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
        threads = actor_threads(int(resources.get("CPU", 1)), replicas, gpus)
        module_ref = ray.put(module.cpu())
        dataset = ray.data.from_arrow(_blocks(todo, replicas))
        decoded = dataset.map_batches(_decode, batch_size=DECODE_BATCH, batch_format="numpy",
                                      fn_kwargs={"preprocessing": preprocessing}, num_cpus=1)
        embedded = decoded.map_batches(
            _Embedder, batch_size=batch_size, batch_format="numpy",
            fn_constructor_kwargs={"module_ref": [module_ref], "dim": work.dim,
                                   "threads": threads},
            compute=ray.data.ActorPoolStrategy(size=replicas),
            num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1)
        for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
            errors = [str(e) or None for e in batch["error"]]
            work.add(_names(batch["id"]), _names(batch["path"]),
                     batch["feature"], errors)
            progress(len(errors))
    finally:
        if started:
            ray.shutdown()


# --- Shards written where they are computed -------------------------------------------------
#
# The driver hands out shard numbers, never images: each actor reads its shard's part of the
# manifest, decodes and embeds it and writes the shard itself (the local engine's
# compute_shard), so throughput grows with the nodes, the driver's memory with the number of
# shards only, and a lost node costs the shards it had in flight, which go to another actor.

MAX_SHARD_LOSSES = 3  # a shard whose actor died this often is refused, not retried forever
WAIT_NOTE_S = 120  # seconds without any actor running before the driver says why it waits

# work(index, decoder, embed) -> images: computes and writes shard ``index`` on the actor
# (decoder.batches(items) yields pool.Batch values; embed(images) -> features).
ShardWork = Callable[[int, object, Callable[[np.ndarray], np.ndarray]], int]


class _ThreadDecoder:
    """What :class:`~imvec.extract.pool.DecodePool` gives the local engine, inside an actor:
    batches decoded by threads (decoders release the GIL), no forked processes in a Ray
    worker."""

    def __init__(self, preprocessing: Preprocessing, batch_size: int, threads: int) -> None:
        self.preprocessing, self.batch_size, self.threads = preprocessing, batch_size, threads
        self.images = np.zeros((batch_size, *preprocessing.size, 3), np.float32)

    def _decode(self, items: Sequence[Item], rows: np.ndarray) -> list[str | None]:
        if self.threads <= 1 or len(items) < 2:
            return decode_into(self.preprocessing, items, rows)
        from concurrent.futures import ThreadPoolExecutor

        step = -(-len(items) // self.threads)
        with ThreadPoolExecutor(self.threads) as pool:
            parts = pool.map(lambda s: decode_into(self.preprocessing, items[s:s + step],
                                                   rows[s:s + step]),
                             range(0, len(items), step))
            return [reason for part in parts for reason in part]

    def batches(self, items: Sequence[Item]) -> Iterator[Batch]:
        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            rows = self.images[:len(chunk)]
            yield Batch(chunk, self._decode(chunk, rows), rows)


class ShardWorker:
    """Ray actor: the model and a decoder; computes and writes whole shards."""

    def __init__(self, module_ref: list, preprocessing: Preprocessing, batch_size: int,
                 threads: int, decode_threads: int, work: ShardWork) -> None:
        import ray
        import torch

        from imvec.extract.pipeline import model_embedder

        torch.set_num_threads(threads)  # this actor's share of its node (actor_threads)
        module = ray.get(module_ref[0])
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        module.to(device)
        self.embed = model_embedder(module, device)
        self.decoder = _ThreadDecoder(preprocessing, batch_size, decode_threads)
        self.work = work

    def ready(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def run(self, index: int) -> tuple[int, int]:
        """Compute and write shard ``index``: (index, images)."""
        return index, self.work(index, self.decoder, self.embed)


def dataset_shard(folder: str, shard_size: int, record: dict, verify_inputs: bool,
                  index: int, decoder, embed) -> int:
    """:data:`ShardWork` of an output folder (:mod:`imvec.extract.dataset`): the shard's
    manifest part in, the shard and its done marker out, as the local engine writes them."""
    from imvec.extract.dataset import compute_shard
    from imvec.extract.manifest import read_manifest

    items = read_manifest(folder, index)
    compute_shard(folder, index, index * shard_size, items, decoder, embed, record,
                  verify_inputs, lambda n: None)
    return len(items)


def run_shards_ray(module: Module, folder, shards: Sequence[int], shard_size: int,
                   record: dict, preprocessing: Preprocessing, batch_size: int,
                   address: str | None, actors: int | None,
                   progress: Callable[[int], None], verify_inputs: bool = False,
                   ) -> RayShardStats:
    """Compute ``shards`` of an output folder on Ray, each written by the actor that
    computed it; the engine-ray twin of :func:`imvec.extract.pipeline.run_shards_local`.
    The folder must be reachable from every node (a shared file system, or a URL prefix
    with the storage credentials on every node)."""
    work = functools.partial(dataset_shard, str(folder), shard_size, record, verify_inputs)
    return run_ray_shards(module, shards, preprocessing, batch_size, work, address, actors,
                          progress)


@dataclass
class RayShardStats:
    """What the cluster did: shards written, actors lost with their node (or a crash),
    shards given to another actor because of it."""

    shards: int = 0
    actors_lost: int = 0
    retried: int = 0
    nodes: set = field(default_factory=set)


def run_ray_shards(module: Module, shards: Iterable[int], preprocessing: Preprocessing,
                   batch_size: int, work: ShardWork, address: str | None = None,
                   actors: int | None = None, progress: Callable[[int], None] = lambda n: None,
                   ) -> RayShardStats:
    """Run ``work`` for every shard number of ``shards`` on a Ray cluster, each actor
    computing and writing its own shards; starts a local Ray unless one is running or
    ``address`` names a cluster."""
    try:
        import ray
    except ImportError as exc:
        raise ImvecError("the Ray engine needs Ray: pip install 'imvec[ray]'") from exc
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        resources = ray.cluster_resources()
        cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
        replicas = actors or max(gpus or cpus, 1)
        # GPUs: one actor per GPU with its share of the CPUs to decode; CPUs: one per CPU
        cpus_each = max(1, cpus // replicas) if gpus else 1
        options = {"num_cpus": cpus_each, "num_gpus": 1 if gpus else 0, "max_restarts": 0,
                   "max_task_retries": 0, "scheduling_strategy": "SPREAD"}
        worker = ray.remote(ShardWorker).options(**options)
        module_ref = ray.put(module.cpu())
        threads = actor_threads(cpus, replicas, gpus)

        def new_actor():
            return worker.remote([module_ref], preprocessing, batch_size, threads,
                                 cpus_each if gpus else 1, work)

        return _schedule(ray, new_actor, replicas, iter(shards), progress)
    finally:
        if started:
            ray.shutdown()


def _schedule(ray, new_actor: Callable, replicas: int, shards: Iterator[int],
              progress: Callable[[int], None]) -> RayShardStats:
    """Keep every live actor busy with one shard until none is left; an actor that dies
    (its node lost) is replaced, and its shard goes back in the queue."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    lost_errors = (RayActorError, ActorDiedError, ActorUnavailableError)
    stats, retry, losses = RayShardStats(), deque(), {}
    starting = {}  # ready() ref -> actor not yet known to be alive
    busy = {}  # run() ref -> (actor, shard number)
    idle: list = []
    for _ in range(replicas):
        actor = new_actor()
        starting[actor.ready.remote()] = actor
    more, failed_starts = True, 0
    try:
        while True:
            while idle and (retry or more):
                index = retry.popleft() if retry else next(shards, None)
                if index is None:
                    more = False
                    break
                actor = idle.pop()
                busy[actor.run.remote(index)] = (actor, index)
            if not busy and not retry and not more:
                return stats
            done, _ = ray.wait([*starting, *busy], num_returns=1, timeout=WAIT_NOTE_S)
            if not done:
                if not busy and not idle:
                    warnings.warn(f"no Ray actor has started for {WAIT_NOTE_S} s: the "
                                  "cluster lacks the CPUs or GPUs one needs (see "
                                  "`ray status`); still waiting", RuntimeWarning, stacklevel=2)
                continue
            ref = done[0]
            if ref in starting:
                actor = starting.pop(ref)
                try:
                    stats.nodes.add(ray.get(ref))
                    idle.append(actor)
                except lost_errors as exc:
                    stats.actors_lost += 1
                    failed_starts += 1
                    if failed_starts >= MAX_SHARD_LOSSES:  # its constructor fails, not a node
                        raise ImvecError(f"Ray actors fail to start ({exc})") from exc
                    replacement = new_actor()
                    starting[replacement.ready.remote()] = replacement
                continue
            actor, index = busy.pop(ref)
            try:
                _, images = ray.get(ref)
            except lost_errors as exc:
                ray.kill(actor)  # gone, or unreachable: either way not used again
                stats.actors_lost += 1
                stats.retried += 1
                losses[index] = losses.get(index, 0) + 1
                if losses[index] >= MAX_SHARD_LOSSES:
                    raise ImvecError(f"shard {index} lost its Ray actor {losses[index]} times "
                                     f"(a node lost, or a decoder crashing the actor: "
                                     f"{type(exc).__name__}); finished shards are kept, "
                                     "rerun to continue") from exc
                retry.append(index)
                replacement = new_actor()
                starting[replacement.ready.remote()] = replacement
                continue
            stats.shards += 1
            progress(images)
            idle.append(actor)
    finally:
        for actor in [*starting.values(), *(a for a, _ in busy.values()), *idle]:
            ray.kill(actor)
