"""ONNX / TorchScript export and the onnxruntime engine, checked against TF's outputs."""

import numpy as np
import pytest
import torch
from conftest import FIXTURES, assert_close

import imvec
from imvec.cli import main
from imvec.export import export

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def tf_case(name):
    return np.load(FIXTURES / name / "inputs.npy"), np.load(FIXTURES / name / "expected.npz")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{(fixture, format): file} written by `imvec export`, once per module."""
    from conftest import TF_FIXTURES  # noqa: F401  (the converted fixture needs conftest)

    cache = {}

    def get(path, fmt, variant=None):
        key = (str(path), fmt, variant)
        if key not in cache:
            out = tmp_path_factory.mktemp("export") / f"model.{fmt}"
            args = ["export", str(path), "--format", fmt, "-o", str(out)]
            assert main(args + (["--variant", variant] if variant else [])) == 0
            cache[key] = out
        return cache[key]

    return get


def run_onnx(path, images):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    return session.run(["default"], {"images": images.astype(np.float32)})[0]


def run_torchscript(path, images):
    graph = torch.jit.load(str(path))
    with torch.no_grad():
        return graph(torch.from_numpy(images)).numpy()


RUNNERS = {"onnx": run_onnx, "torchscript": run_torchscript}


@pytest.mark.parametrize("fmt", list(RUNNERS))
def test_nasnet_export_matches_tf_at_any_batch(fmt, converted, exported):
    images, expected = tf_case("nasnet_mobile_small")
    path = exported(converted("nasnet_mobile_small"), fmt, "classification")
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no scratch left
    assert_close(f"{fmt} logits", RUNNERS[fmt](path, images), expected["logits"])
    assert_close(f"{fmt} logits batch 1", RUNNERS[fmt](path, images[1:]), expected["logits"][1:])
    tripled = np.concatenate([images, images[:1]])
    assert RUNNERS[fmt](path, tripled).shape == (3, 1001)


@pytest.mark.parametrize("fmt", list(RUNNERS))
def test_mobilenet_export_takes_any_size(fmt, converted, exported):
    path = exported(converted("mobilenet_v1_025_128"), fmt)
    for name in ("mobilenet_v1_025_128", "mobilenet_v1_025_128_at192"):
        images, expected = tf_case(name)
        assert_close(f"{fmt} {name}", RUNNERS[fmt](path, images), expected["features"])
    odd = np.random.default_rng(0).random((2, 97, 131, 3), dtype=np.float32)
    module = imvec.load(converted("mobilenet_v1_025_128"), engine="faithful")
    assert_close(f"{fmt} 97x131", RUNNERS[fmt](path, odd), module(odd).numpy())


def test_onnxruntime_engine_matches_tf(converted):
    images, expected = tf_case("nasnet_mobile_small")
    module = imvec.load(converted("nasnet_mobile_small"), engine="onnxruntime")
    assert_close("ort features", module(images).numpy(), expected["features"])
    sessions = module._inference._built._sessions  # (pre_logits, h, w, unit_range)
    assert [key[-1] for key in sessions] == [True]  # [0, 1] in, scaled in ORT's graph
    scaled = torch.from_numpy(images * np.float32(2) - np.float32(1))
    assert_close("ort, scaled input", module.forward_scaled(scaled.contiguous()).numpy(),
                 expected["features"])
    assert sorted(key[-1] for key in sessions) == [False, True]
    outputs = module(images, as_dict=True)  # end points come from the fast torch graph
    assert_close("ort Stem", outputs["Stem"].numpy(), expected["end_points/Stem"])
    classifier = imvec.load(converted("nasnet_mobile_small"), variant="classification",
                            engine="onnxruntime")
    assert_close("ort logits", classifier(images).numpy(), expected["logits"])


def test_onnxruntime_exports_are_cached_by_weights(converted, monkeypatch):
    import imvec.engines.onnx.runtime as runtime
    from imvec._paths import home

    images, expected = tf_case("mobilenet_v1_025_128")
    first = imvec.load(converted("mobilenet_v1_025_128"), engine="onnxruntime")
    first(images)  # exports, or finds an earlier test's export of these weights
    cached = sorted((home() / "onnx").glob("*.onnx"))
    assert cached

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(runtime, "export_onnx", no_export)
    again = imvec.load(converted("mobilenet_v1_025_128"), engine="onnxruntime")
    assert_close("from the cache", again(images).numpy(), expected["features"])
    with torch.no_grad():  # other weights: another entry, so an export
        again.variable_map["MobilenetV1/Conv2d_0/BatchNorm/beta"].add_(0.5)
    with pytest.raises(AssertionError, match="exported again"):
        again(images)
    monkeypatch.undo()
    for path in cached:  # a damaged entry is exported again, not trusted
        path.write_bytes(b"not onnx")
    third = imvec.load(converted("mobilenet_v1_025_128"), engine="onnxruntime")
    assert_close("after damage", third(images).numpy(), expected["features"])


def test_auto_engine_falls_back_to_the_fast_graph(converted, monkeypatch):
    import imvec.engines.onnx.runtime as runtime

    images, expected = tf_case("nasnet_mobile_small")
    monkeypatch.setenv("IMVEC_HOME", str(FIXTURES.parent / "no-such-cache-dir-used"))

    def broken(*args, **kwargs):
        raise RuntimeError("exporter broke")

    monkeypatch.setattr(runtime, "export_onnx", broken)
    monkeypatch.setattr(runtime, "cache_path", lambda *a: None)
    module = imvec.load(converted("nasnet_mobile_small"))
    assert module.engine == "onnxruntime"
    with pytest.warns(RuntimeWarning, match="exporter broke.*'fast' engine instead"):
        features = module(images)
    assert module.engine == "fast"
    assert_close("fallback", features.numpy(), expected["features"])
    explicit = imvec.load(converted("nasnet_mobile_small"), engine="onnxruntime")
    with pytest.raises(RuntimeError, match="exporter broke"):
        explicit(images)
    chosen = imvec.load(converted("nasnet_mobile_small")).double()  # not float32: fast graph
    out = chosen(images)
    assert out.dtype == torch.float64 and chosen.engine == "onnxruntime"
    assert_close("float64", out.numpy(), expected["features"])


def test_plain_network_export(tmp_path, capfd, caplog):
    net = imvec.create_model("mobilenet_v1", depth_multiplier=0.25).eval()
    path = export(net, tmp_path / "net.onnx", input_size=(64, 64))
    # Without torchvision (as beside the CPU torch) torch's exporter logs a line for each
    # torchvision op it skips; they concern no imvec graph and are kept out of the output.
    logged = [*caplog.messages, capfd.readouterr().err]  # under pytest the log goes to caplog
    assert not [line for line in logged if "torchvision" in line]
    x = torch.rand(3, 3, 80, 72) * 2 - 1
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert_close("plain net", session.run(None, {"x": x.numpy()})[0], net(x).numpy())


def test_bad_format_is_named(tmp_path, converted, capsys):
    module = imvec.load(converted("mobilenet_v1_025_128"))
    with pytest.raises(ValueError, match="'tflite'.*onnx, torchscript"):
        export(module, tmp_path / "x.tflite", "tflite")
    assert main(["export", "no_such_model", "-o", str(tmp_path / "x.onnx")]) == 1
    assert "imvec export: error:" in capsys.readouterr().err


@pytest.mark.parametrize("name, unit_reader", [("mobilenet_v1_025_128", "Sub"),
                                               ("nasnet_mobile_small", "Reshape")])
def test_onnx_graphs_read_nhwc_images_in_place(name, unit_reader, converted, exported):
    """No NHWC -> NCHW transpose of the batch; at most one pass over the images for their
    range (none where the first convolution reads no padding: NASNet's 'VALID' stem)."""
    import onnx

    from imvec.engines.onnx.cache import cache_path as _cache_path

    module = imvec.load(converted(name), engine="onnxruntime")
    images, _ = tf_case(name)
    module(images)
    module.forward_scaled(torch.from_numpy(images * np.float32(2) - np.float32(1)))
    graphs = {"export": exported(converted(name), "onnx")}
    for unit_range in (True, False):
        graphs[f"engine, unit_range={unit_range}"] = _cache_path(
            module.net, True, images.shape[1:3], unit_range)
    for what, path in graphs.items():
        graph = onnx.load(str(path)).graph
        assert "Transpose" not in [n.op_type for n in graph.node], what
        first = [n.op_type for n in graph.node  # what reads the batch (not only its shape)
                 if graph.input[0].name in n.input and n.op_type != "Shape"]
        assert first == (["Reshape"] if what.endswith("False") else [unit_reader]), what


@pytest.mark.parametrize("size", [(33, 33), (32, 47)])
@pytest.mark.parametrize("unit_range", [True, False])
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_nhwc_stem_is_the_first_convolution(size, unit_range, padding):
    from imvec.engines.fusion import FusedConv, portable_ops
    from imvec.engines.onnx.graphs import _NhwcStem
    from imvec.nets.ops import Conv2d

    torch.manual_seed(0)
    conv = FusedConv(Conv2d(3, 8, 3, 2, padding=padding, bias=True))
    images = torch.rand(2, *size, 3)
    scaled = images * 2 - 1 if unit_range else images
    with torch.no_grad(), portable_ops():
        expected = conv(scaled.permute(0, 3, 1, 2), "relu6")
        got = _NhwcStem(conv, unit_range)(images.permute(0, 3, 1, 2), "relu6")
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_onnx_cache_keeps_the_recently_used_exports_under_its_limit(converted, tmp_path,
                                                                     monkeypatch):
    import os

    from imvec.engines.onnx.cache import prune_onnx_cache

    folder = tmp_path / "onnx"
    folder.mkdir()
    for age, name in enumerate(["newest", "middle", "oldest"]):  # 1 MiB each
        path = folder / f"{name}.onnx"
        path.write_bytes(b"\0" * 2**20)
        os.utime(path, (1e9 - age * 100, 1e9 - age * 100))
    (folder / "notes.txt").write_text("not an export")
    deleted = prune_onnx_cache(folder, keep=folder / "oldest.onnx", limit_gb=2.5 / 1024)
    assert [p.name for p in deleted] == ["middle.onnx"]  # the oldest is the one kept
    assert sorted(p.name for p in folder.iterdir()) == ["newest.onnx", "notes.txt",
                                                        "oldest.onnx"]
    monkeypatch.setenv("IMVEC_ONNX_CACHE_GB", "lots")
    with pytest.raises(ValueError, match=r"\$IMVEC_ONNX_CACHE_GB must be a number of GB"):
        prune_onnx_cache(folder)
    # in an export, a bad limit warns and costs nothing: the session runs, the file is kept
    monkeypatch.setenv("IMVEC_HOME", str(tmp_path / "bad-limit"))
    images, expected = tf_case("mobilenet_v1_025_128")
    module = imvec.load(converted("mobilenet_v1_025_128"), engine="onnxruntime")
    with pytest.warns(RuntimeWarning, match="IMVEC_ONNX_CACHE_GB must be a number.*not pruned"):
        features = module(images)
    assert module.engine == "onnxruntime"
    assert_close("bad limit", features.numpy(), expected["features"])
    assert list((tmp_path / "bad-limit" / "onnx").glob("*.onnx"))
    # in use: a cache hit marks the export recently used; a new export prunes the rest
    monkeypatch.setenv("IMVEC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("IMVEC_ONNX_CACHE_GB", "0")
    images, expected = tf_case("mobilenet_v1_025_128")
    imvec.load(converted("mobilenet_v1_025_128"), engine="onnxruntime")(images)
    (first,) = (tmp_path / "home" / "onnx").glob("*.onnx")
    os.utime(first, (1e9, 1e9))
    again = imvec.load(converted("mobilenet_v1_025_128"), engine="onnxruntime")
    assert_close("cache hit", again(images).numpy(), expected["features"])
    assert first.stat().st_mtime > 1e9 + 1000
    imvec.load(converted("nasnet_mobile_small"), engine="onnxruntime")(
        np.load(FIXTURES / "nasnet_mobile_small" / "inputs.npy"))
    assert first not in (tmp_path / "home" / "onnx").glob("*.onnx")  # pruned, over 0 GB
    assert len(list((tmp_path / "home" / "onnx").glob("*.onnx"))) == 1
