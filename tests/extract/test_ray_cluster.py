"""The Ray runner on a real two-node cluster started here (two `ray start` processes, token
auth on): actors write their own shards of an output folder; losing the worker node mid-run
costs only its shards in flight; an interrupted run resumes from the done shards. Every
image exactly once, the vectors the module gives for those pixels and those of an
uninterrupted run. Select with `-m ray_cluster` (about a minute)."""

from __future__ import annotations

import functools
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from extract_helpers import make_folder, random_mobilenet, reference_features
from ray_cluster import RayCluster

import imvec
from imvec._io import atomic_write_text
from imvec.extract import ExtractJob
from imvec.extract.dataset import open_dataset, plan
from imvec.extract.provenance import describe, preprocessing_for
from imvec.extract.ray_engine import dataset_shard, run_ray_shards
from imvec.extract.shards import read_dataset, read_marker

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray_cluster

SHARD, SHARDS = 5, 12  # 60 images
RUN_TIMEOUT = 150  # seconds one run may take before the test fails instead of hanging


def noting_node(nodes: str, work, index, decoder, embed):
    """The real shard work, then a note of the node that did it. It takes its time, like a
    remote store, so that both actors are up before the work is gone."""
    time.sleep(0.2)
    images = work(index, decoder, embed)
    atomic_write_text(Path(nodes) / f"{index:05d}", ray.get_runtime_context().get_node_id())
    return images


def _reload_ray_auth() -> None:
    """Ray reads RAY_AUTH_MODE / RAY_AUTH_TOKEN once per process (a fresh `imvec extract`
    needs nothing more); this long-lived test process changes them, so it reloads them."""
    from ray._private.authentication.authentication_token_setup import (
        AuthenticationTokenLoader,
    )
    from ray._raylet import Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture(scope="module")
def cluster():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # for noting_node
    nodes = RayCluster()
    try:
        nodes.start()
        with pytest.MonkeyPatch.context() as patch:
            for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):  # the driver needs them too
                patch.setenv(name, nodes.env[name])
            _reload_ray_auth()
            yield nodes
        _reload_ray_auth()
    finally:
        nodes.stop()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    folder = make_folder(root / "photos", SHARD * SHARDS)
    module = imvec.load(random_mobilenet(root / "random.safetensors"))
    expected = {p.relative_to(folder).as_posix(): reference_features(module, p, 32)
                for p in folder.rglob("*.jpg")}
    return module, folder, expected


def run(cluster, setup, output: Path, progress=lambda n: None):
    """What `imvec extract photos/ -o output/ --runner ray` does, against the cluster, in a
    thread that must finish in time; (stats, {shard: node that wrote it})."""
    module, folder, _ = setup
    job = ExtractJob((str(folder),), module, output, size=32, shard_size=SHARD,
                     progress=False)
    preprocessing = preprocessing_for(module, 32, None, job.max_pixels, False)
    record = describe(module, preprocessing, "parquet")
    state = open_dataset(job, record)
    pending, _ = plan(output, state, record, verify=False)
    nodes = output.parent / f"{output.name}.nodes"
    nodes.mkdir(exist_ok=True)
    work = functools.partial(noting_node, str(nodes), functools.partial(
        dataset_shard, str(output), SHARD, record, False))
    outcome = {}

    def target():
        try:
            outcome["stats"] = run_ray_shards(module, pending, preprocessing, 4, work,
                                              cluster.address, actors=2, progress=progress)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(RUN_TIMEOUT)
    assert not thread.is_alive(), f"the Ray run took longer than {RUN_TIMEOUT} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["stats"], writers(output)


def writers(output: Path) -> dict[int, str]:
    folder = output.parent / f"{output.name}.nodes"
    return {int(p.name): p.read_text() for p in folder.iterdir() if not p.name.startswith(".")}


def vectors(output: Path) -> dict[str, np.ndarray]:
    """{id: vector} of the output folder; every shard done, every id exactly once."""
    assert all(read_marker(output, index) for index in range(SHARDS))
    ids, features = read_dataset(output)
    assert len(ids) == len(set(ids)) == SHARD * SHARDS
    return dict(zip(ids, features, strict=True))


@pytest.fixture(scope="module")
def uninterrupted(cluster, setup, tmp_path_factory):
    output = tmp_path_factory.mktemp("whole") / "features"
    stats, nodes = run(cluster, setup, output)
    return stats, nodes, vectors(output)


def test_both_nodes_compute_and_write_their_shards(setup, uninterrupted):
    _, _, expected = setup
    stats, nodes, whole = uninterrupted
    assert (stats.shards, len(nodes), stats.actors_lost) == (SHARDS, SHARDS, 0)
    assert len(set(nodes.values())) == 2  # each node wrote shards
    assert sorted(whole) == sorted(expected)
    for ident, vector in whole.items():
        np.testing.assert_allclose(vector, expected[ident], rtol=1e-4, atol=1e-5)


def test_losing_the_worker_node_mid_run_costs_only_its_shards(cluster, setup, uninterrupted,
                                                             tmp_path):
    output, killed = tmp_path / "features", []

    def kill_worker_once_it_wrote_a_shard(count):
        if not killed and len(set(writers(output).values())) == 2:
            cluster.kill("worker")  # SIGKILL of its raylet, workers and agents
            killed.append(len(writers(output)))

    stats, _ = run(cluster, setup, output, kill_worker_once_it_wrote_a_shard)
    assert killed and killed[0] < SHARDS and stats.actors_lost == 1 and stats.retried <= 1
    found = vectors(output)
    assert sorted(found) == sorted(uninterrupted[2])
    for ident, vector in found.items():
        np.testing.assert_array_equal(vector, uninterrupted[2][ident])


def test_an_interrupted_run_resumes_from_its_done_shards(cluster, setup, uninterrupted,
                                                         tmp_path):
    output, done = tmp_path / "features", []

    def interrupt_after_three(count):
        done.append(count)
        if len(done) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(cluster, setup, output, interrupt_after_three)
    before = sum(read_marker(output, index) is not None for index in range(SHARDS))
    stats, _ = run(cluster, setup, output)
    assert 3 <= before < SHARDS and stats.shards == SHARDS - before
    found = vectors(output)
    assert sorted(found) == sorted(uninterrupted[2])
    for ident, vector in found.items():
        np.testing.assert_array_equal(vector, uninterrupted[2][ident])
