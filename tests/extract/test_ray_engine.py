"""The Ray Data engine on a local Ray instance: same file as the local engine, same resume."""

import numpy as np
import pytest
from extract_helpers import make_folder, random_mobilenet

from imvec.extract import ExtractJob, read_features, read_metadata, run

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")


@pytest.fixture(scope="module")
def local_ray():
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


def test_ray_engine_writes_what_the_local_engine_writes(local_ray, setup, tmp_path):
    folder, weights, local = setup
    result = run(ExtractJob((str(folder),), weights, tmp_path / "ray.parquet", size=32,
                            engine="ray", batch_size=4, progress=False))
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
        run(ExtractJob((str(folder),), weights, out, size=32, crop=0.875, engine="ray",
                       progress=False))
    result = run(ExtractJob((str(folder),), weights, out, size=32, engine="ray",
                            progress=False))
    assert 0 < result.computed < 31 and result.total == 31
    ids, features = read_features(out)
    local_ids, local_features = read_features(local)
    assert ids == local_ids
    np.testing.assert_allclose(features, local_features, rtol=1e-5, atol=1e-6)
