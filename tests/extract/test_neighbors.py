"""nearest / neighbors: exact cosine top-k over a chunked index, against brute force."""

import numpy as np
import pytest
from extract_helpers import make_folder, random_mobilenet

import imvec
from imvec.errors import ImvecError
from imvec.extract import ExtractJob, nearest, neighbors, read_features, run


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("index")
    folder = make_folder(root / "in", 23)
    weights = random_mobilenet(root / "random.safetensors")
    out = run(ExtractJob((str(folder),), weights, root / "f.parquet", size=32,
                         progress=False, workers=1)).output
    npy = run(ExtractJob((str(folder),), weights, root / "f.npy", size=32, progress=False,
                         workers=1)).output
    return folder, weights, out, npy


def brute_force(features, queries, k):
    f = features / np.linalg.norm(features, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = q @ f.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


@pytest.mark.parametrize("chunk_rows", [5, 7, 1000])
@pytest.mark.parametrize("kind", ["parquet", "npy"])
def test_nearest_equals_brute_force_across_chunks(index, chunk_rows, kind):
    _, _, parquet, npy = index
    path = parquet if kind == "parquet" else npy
    ids, features = read_features(path)
    queries = np.random.default_rng(0).normal(size=(3, features.shape[1])).astype(np.float32)
    queries[0] = features[11] * 3  # scale does not matter for cosine
    found = nearest(path, queries, k=6, chunk_rows=chunk_rows)
    order, scores = brute_force(features.astype(np.float64), queries.astype(np.float64), 6)
    for hits, rows, best in zip(found, order, scores, strict=True):
        assert [h.id for h in hits] == [ids[r] for r in rows]
        np.testing.assert_allclose([h.score for h in hits], best, rtol=1e-5, atol=1e-6)
    assert found[0][0].id == ids[11] and found[0][0].score == pytest.approx(1.0, abs=1e-5)


def test_k_larger_than_the_index_returns_everything(index):
    _, _, parquet, _ = index
    ids, features = read_features(parquet)
    found = nearest(parquet, features[0], k=100)
    assert len(found) == 1 and sorted(h.id for h in found[0]) == sorted(ids)
    with pytest.raises(ValueError, match="k must be at least 1"):
        nearest(parquet, features[0], k=0)


def test_query_image_finds_itself_first(index):
    folder, weights, parquet, _ = index
    query = sorted(folder.rglob("*.jpg"))[5]
    (hits,) = neighbors([query], parquet, k=3)
    assert hits[0].path == str(query) and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].score >= hits[1].score >= hits[2].score


def test_another_model_is_refused(index):
    folder, _, parquet, _ = index
    other = imvec.load("mobilenet_v1_050_160", pretrained=False)
    with pytest.raises(ImvecError, match="was made with weights sha256 .*--model"):
        neighbors([sorted(folder.rglob("*.jpg"))[0]], parquet, model=other)


def test_dimension_mismatch_is_refused(index):
    _, _, parquet, _ = index
    with pytest.raises(ImvecError, match="holds 256-dim vectors; the queries have 3"):
        nearest(parquet, np.ones(3), k=1)
