"""Channel counts padded to ONNX Runtime's NCHWc block: same outputs as TF, aligned convs."""

import numpy as np
import pytest
from conftest import FIXTURES, assert_close

from imvec.cli import main
from imvec.engines.onnx.nchwc import align_channels, nchwc_block

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
helper = onnx.helper


@pytest.fixture(scope="module")
def exported(converted, tmp_path_factory):
    """The portable (unaligned) export of a TF fixture, by (name, variant)."""
    cache = {}

    def get(name, variant="feature_vector"):
        if (name, variant) not in cache:
            out = tmp_path_factory.mktemp("nchwc") / f"{name}.onnx"
            assert main(["export", str(converted(name)), "--format", "onnx", "-o", str(out),
                         "--variant", variant]) == 0
            cache[name, variant] = out
        return cache[name, variant]

    return get


def run(model, inputs):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run(None, {name: inputs})[0]


def conv_widths(model):
    sizes = {t.name: t.dims[0] for t in model.graph.initializer if t.dims}
    return [sizes[node.input[1]] for node in model.graph.node if node.op_type == "Conv"]


def ops(model):
    return [node.op_type for node in model.graph.node]


def gathered(model):
    """The ops whose outputs are gathered back to their real channels."""
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    return [producers[node.input[0]] for node in model.graph.node if node.op_type == "Gather"]


@pytest.mark.parametrize("block", [8, 16])
@pytest.mark.parametrize("name", ["nasnet_mobile_small", "pnasnet_large_small"])
def test_aligned_graphs_match_tf(name, block, exported):
    images = np.load(FIXTURES / name / "inputs.npy")
    expected = np.load(FIXTURES / name / "expected.npz")["features"]
    model = onnx.load(exported(name))
    assert any(width % block for width in conv_widths(model))  # 12 filters: 3, 6, 12, 24
    aligned = align_channels(model, block)
    assert all(width % block == 0 for width in conv_widths(aligned))
    # the factorized reductions' adds (concat + pooled conv) were placed alike, so only
    # the pooled features ([batch, channels]) are gathered
    assert set(gathered(aligned)) <= {"ReduceMean"}
    assert_close(f"aligned to {block}", run(aligned, images), expected)


def test_classifier_reads_the_real_channels(exported):
    images = np.load(FIXTURES / "nasnet_mobile_small" / "inputs.npy")
    expected = np.load(FIXTURES / "nasnet_mobile_small" / "expected.npz")["logits"]
    aligned = align_channels(onnx.load(exported("nasnet_mobile_small", "classification")), 16)
    assert gathered(aligned) == ["ReduceMean"]  # the pooled features, before the classifier
    assert_close("aligned logits", run(aligned, images), expected)


def tiny_graph(clip_low: float):
    """conv (3 -> 5 channels) -> clip -> channel softmax: ops the pass must not pad through."""
    rng = np.random.default_rng(0)
    weights = [onnx.numpy_helper.from_array(a.astype(np.float32), n) for n, a in (
        ("w", rng.normal(size=(5, 3, 3, 3))), ("b", rng.normal(size=5)),
        ("low", np.array(clip_low)), ("high", np.array(6.0)))]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c", "low", "high"], ["r"]),
             helper.make_node("Softmax", ["r"], ["y"], axis=1)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 5, 8, 8])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize(("clip_low", "gathered_before"), [(0.0, "Softmax"), (0.5, "Clip")])
def test_unknown_ops_get_the_real_channels(clip_low, gathered_before):
    x = np.random.default_rng(1).random((2, 3, 8, 8), dtype=np.float32)
    reference = run(tiny_graph(clip_low), x)
    aligned = align_channels(tiny_graph(clip_low), 8)
    assert conv_widths(aligned) == [8]
    names = ops(aligned)
    assert names[names.index("Gather") + 1] == gathered_before  # clip(0.5) makes zeros 0.5
    np.testing.assert_allclose(run(aligned, x), reference, rtol=1e-6, atol=1e-7)


def test_no_blocked_layout_no_change(monkeypatch):
    monkeypatch.setattr("platform.machine", lambda: "arm64")
    assert nchwc_block() == 1
    model = tiny_graph(0.0)
    assert align_channels(model, nchwc_block()) is model
    assert conv_widths(model) == [5]
