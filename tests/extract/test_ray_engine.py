"""The Ray runner on a local Ray instance: same file as the local runner, same resume."""


import numpy as np
import pytest
from extract_helpers import RAY_TOKEN, make_folder, random_mobilenet

from imvec.extract import ExtractJob, read_features, read_metadata, run

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")


@pytest.fixture(scope="module")
def local_ray():
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_TOKEN", RAY_TOKEN)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        yield
        ray.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    folder = make_folder(root / "photos", 30)
    (folder / "group2" / "broken.jpg").write_bytes(b"nope")
    weights = random_mobilenet(root / "random.safetensors")
    local = run(ExtractJob((str(folder),), weights, root / "local.parquet", size=32,
                           progress=False, workers=1)).output
    return folder, weights, local


# --- An output folder on Ray: actors write the shards -----------------------------------------
# First in the module: with Ray 2.60 a raylet that already ran Ray Data jobs crashed (a failed
# check in HandleRequestWorkerLease) when these actors were leased after them.

def test_ray_engine_writes_an_output_folder_and_resumes_it(local_ray, setup, tmp_path,
                                                           monkeypatch):
    folder, weights, _ = setup
    options = {"size": 32, "progress": False, "shard_size": 8, "batch_size": 4}
    local = run(ExtractJob((str(folder),), weights, tmp_path / "local", workers=1, **options))
    out = tmp_path / "ray"
    from imvec.extract import pipeline

    real = pipeline.model_embedder

    def crash_after_two(module, device):
        embed, calls = real(module, device), []

        def maybe(batch):
            calls.append(1)
            if len(calls) > 2:
                raise KeyboardInterrupt
            return embed(batch)

        return maybe

    monkeypatch.setattr(pipeline, "model_embedder", crash_after_two)
    with pytest.raises(KeyboardInterrupt):  # shard 0 written, then stopped in shard 1
        run(ExtractJob((str(folder),), weights, out, workers=1, **options))
    monkeypatch.undo()
    result = run(ExtractJob((str(folder),), weights, out, runner="ray", **options))
    assert (result.total, result.ok, result.failed) == (31, 30, 1)
    assert 0 < result.computed < 31  # shard 0 was not computed again
    ids, features = read_features(out)
    local_ids, local_features = read_features(local.output)
    assert ids == local_ids and len(set(ids)) == 30
    np.testing.assert_allclose(features, local_features, rtol=1e-5, atol=1e-6)
    assert (out / "_errors.csv").read_text() == (local.output / "_errors.csv").read_text()


def test_ray_actors_run_the_engine_the_job_chose(local_ray, setup, monkeypatch):
    """The module reaches the actors as run_ray and run_ray_shards send it (ray.put, then
    ray.get in the actor), and its engine with it."""
    from imvec.extract.provenance import load_module

    _, weights, _ = setup
    monkeypatch.delenv("IMVEC_ENGINE", raising=False)

    @ray.remote(num_cpus=0)
    def engine_in_a_worker(module_ref: list) -> str:
        return ray.get(module_ref[0]).engine

    for engine, expected in ((None, "fast"), ("faithful", "faithful")):
        module = load_module(str(weights), engine=engine)
        assert ray.get(engine_in_a_worker.remote([ray.put(module.cpu())])) == expected


@pytest.mark.parametrize("output", ["names", "names.parquet"])
def test_ray_engine_keeps_names_that_are_not_utf8(local_ray, setup, tmp_path, output):
    source, weights, _ = setup
    folder = tmp_path / "photos"
    folder.mkdir()
    odd = b"caf\xe9.jpg".decode("utf-8", "surrogateescape")  # Latin-1 bytes, not UTF-8
    (folder / odd).write_bytes((source / "group0" / "img0000.jpg").read_bytes())
    (folder / "plain.jpg").write_bytes((source / "group1" / "img0001.jpg").read_bytes())
    options = {"size": 32, "progress": False, "shard_size": 1}
    result = run(ExtractJob((str(folder),), weights, tmp_path / output, runner="ray",
                            **options))
    local = run(ExtractJob((str(folder),), weights, tmp_path / f"local-{output}", workers=1,
                           **options))
    assert (result.ok, result.failed) == (2, 0)
    ids, features = read_features(result.output)
    assert sorted(ids) == sorted([odd, "plain.jpg"])
    local_ids, local_features = read_features(local.output)
    assert ids == local_ids
    np.testing.assert_allclose(features, local_features, rtol=1e-5, atol=1e-6)


def test_ray_engine_writes_what_the_local_engine_writes(local_ray, setup, tmp_path):
    folder, weights, local = setup
    with pytest.warns(DeprecationWarning, match="use runner='ray'"):  # the old spelling
        job = ExtractJob((str(folder),), weights, tmp_path / "ray.parquet", size=32,
                         engine="ray", batch_size=4, progress=False)
    assert (job.runner, job.engine) == ("ray", None)
    result = run(job)
    assert (result.total, result.ok, result.failed) == (31, 30, 1)
    ids, features = read_features(result.output)
    local_ids, local_features = read_features(local)
    assert ids == local_ids
    np.testing.assert_allclose(features, local_features, rtol=1e-5, atol=1e-6)
    assert read_metadata(result.output) == read_metadata(local)
    assert (tmp_path / "ray.errors.csv").read_text() == (local.parent / "local.errors.csv"
                                                         ).read_text()


def test_ray_engine_continues_unfinished_work_and_keeps_the_resume_rule(local_ray, setup,
                                                                        tmp_path, monkeypatch):
    folder, weights, local = setup
    out = tmp_path / "f.parquet"
    from imvec.extract import pipeline

    real = pipeline.model_embedder

    def crash_after_three(module, device):
        embed, calls = real(module, device), []

        def maybe(batch):
            calls.append(1)
            if len(calls) > 3:
                raise KeyboardInterrupt
            return embed(batch)

        return maybe

    monkeypatch.setattr(pipeline, "model_embedder", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        run(ExtractJob((str(folder),), weights, out, size=32, batch_size=2, commit_every=2,
                       progress=False, workers=1))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="preprocessing crop was None, now 0.875"):
        run(ExtractJob((str(folder),), weights, out, size=32, crop=0.875, runner="ray",
                       progress=False))
    # another inference engine does not stop a resume: the vectors agree to float32 rounding
    result = run(ExtractJob((str(folder),), weights, out, size=32, runner="ray",
                            engine="faithful", progress=False))
    assert 0 < result.computed < 31 and result.total == 31
    ids, features = read_features(out)
    local_ids, local_features = read_features(local)
    assert ids == local_ids
    np.testing.assert_allclose(features, local_features, rtol=1e-5, atol=1e-6)


# --- The shard scheduler, against a stand-in for Ray (no cluster needed) ---------------------

class FakeRef:
    def __init__(self, value=None, error=None):
        self.value, self.error = value, error


class FakeActor:
    """An actor whose run() fails as a lost actor would when ``dies_on`` says so."""

    def __init__(self, cluster):
        self.cluster, self.alive = cluster, not cluster.broken
        self.ready = type("M", (), {"remote": lambda _: self._call(lambda: "node")})()
        self.run = type("M", (), {"remote": lambda _, index: self._call(
            lambda: self._run(index))})()

    def _call(self, work):
        if not self.alive:
            return FakeRef(error=self.cluster.lost())
        try:
            return FakeRef(work())
        except LookupError:
            self.alive = False
            return FakeRef(error=self.cluster.lost())

    def _run(self, index):
        if self.cluster.dies_on(index):
            raise LookupError  # the actor's process dies on this shard
        self.cluster.written.append(index)
        return index, 4


class FakeRay:
    def __init__(self, dies_on):
        from ray.exceptions import ActorDiedError

        self.lost = ActorDiedError
        self.dies_on, self.written, self.killed, self.actors = dies_on, [], [], []
        self.broken = False  # actors die in their constructor

    def new_actor(self):
        self.actors.append(FakeActor(self))
        return self.actors[-1]

    def wait(self, refs, num_returns, timeout=None):
        return refs[:1], refs[1:]

    def get(self, ref):
        if ref.error is not None:
            raise ref.error
        return ref.value

    def kill(self, actor):
        self.killed.append(actor)


def schedule(dies_on, shards=6, replicas=2, broken=False):
    from imvec.extract.ray_engine import _schedule

    fake, counted = FakeRay(dies_on), []
    fake.broken = broken
    stats = _schedule(fake, fake.new_actor, replicas, iter(range(shards)), counted.append)
    return fake, stats, counted


def test_every_shard_is_written_once_and_counted():
    fake, stats, counted = schedule(lambda index: False)
    assert sorted(fake.written) == list(range(6)) and counted == [4] * 6
    assert (stats.shards, stats.actors_lost, stats.retried) == (6, 0, 0)
    assert len(fake.killed) == 2  # the pool is ended with the job


def test_a_lost_actor_costs_its_shard_in_flight_which_another_actor_writes():
    died = []

    def once_on_shard_two(index):
        if index == 2 and not died:
            died.append(index)
            return True
        return False

    fake, stats, _ = schedule(once_on_shard_two)
    assert sorted(fake.written) == list(range(6))  # shard 2 too, exactly once
    assert (stats.shards, stats.actors_lost, stats.retried) == (6, 1, 1)
    assert len(fake.actors) == 3  # a replacement was started


def test_a_shard_that_kills_every_actor_stops_the_job_with_its_number():
    from imvec.errors import ImvecError

    with pytest.raises(ImvecError, match="shard 4 lost its Ray actor 3 times"):
        schedule(lambda index: index == 4)


def test_actors_that_cannot_start_stop_the_job_instead_of_being_replaced_forever():
    from imvec.errors import ImvecError

    with pytest.raises(ImvecError, match="Ray actors fail to start"):
        schedule(lambda index: False, broken=True)

