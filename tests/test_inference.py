"""The inference engine against TensorFlow's numbers, and its separation from the
faithful graph (which training and ``variable_map`` keep using)."""

import copy
import pickle

import numpy as np
import pytest
import torch
from conftest import FIXTURES, TF_FIXTURES, assert_close

import imvec
from imvec.engines import fusion
from imvec.engines.fast import FastMobileNetV1, FastNASNetwork, fast_network
from imvec.engines.graph import InferenceGraph, onnxruntime_available, optimize
from imvec.nets.ops import BatchNorm

# How the convolutions run: as PyTorch picks by size, all through oneDNN's fused op, or
# with no oneDNN at all (F.conv2d, as on a build without it).
KERNELS = {
    "auto": {},
    "onednn": {"SMALL_GEMM_FLOPS": 0},
    "reference": {"SMALL_GEMM_FLOPS": 0, "_MKLDNN": False},
}


@pytest.fixture(params=list(KERNELS))
def kernels(request, monkeypatch):
    for name, value in KERNELS[request.param].items():
        monkeypatch.setattr(fusion, name, value)
    return request.param


def fixture_inputs(name):
    return np.load(FIXTURES / name / "inputs.npy")


@pytest.mark.parametrize("name", list(TF_FIXTURES))
def test_fast_engine_matches_tf(name, converted, kernels):
    """Features, logits and end points of the default engine vs TF's stored outputs."""
    expected = np.load(FIXTURES / name / "expected.npz")
    images = fixture_inputs(name)
    variant = "classification" if "logits" in expected else "feature_vector"
    module = imvec.load(converted(name), variant=variant, engine="fast")
    net = module.net
    x = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1
    fast = optimize(net)
    assert isinstance(fast, (FastNASNetwork, FastMobileNetV1))
    end_points = {}
    with torch.no_grad():
        outputs = {"features": fast(x, end_points, pre_logits=True)}
        if variant == "classification":
            outputs["logits"] = fast(x)
    outputs.update({f"end_points/{k}": v.permute(0, 2, 3, 1) for k, v in end_points.items()})
    if "end_points/Stem" in outputs:  # AmoebaNet's TF end point is named after the cell scope
        outputs["end_points/cell_stem_1"] = outputs["end_points/Stem"]
    for key in expected.files:
        assert_close(f"{name} {key}", outputs[key].numpy(), expected[key])


@pytest.mark.parametrize("name", ["nasnet_mobile_small", "mobilenet_v1_025_128",
                                  "mobilenet_v1_025_128_at192", "nasnet_large_small"])
def test_module_default_engine_matches_tf(name, converted):
    """Whichever engine "auto" picks; end points (as_dict) always come from the fast graph."""
    expected = np.load(FIXTURES / name / "expected.npz")
    images = fixture_inputs(name)
    module = imvec.load(converted(name))
    assert_close(f"{name} features", module(images).numpy(), expected["features"])
    outputs = module(images, as_dict=True)
    engine = module._inference._fast or module._inference._built
    assert isinstance(engine, (FastNASNetwork, FastMobileNetV1))
    assert_close(f"{name} features", outputs["default"].numpy(), expected["features"])
    for key in expected.files:
        if key.startswith("end_points/"):
            assert_close(f"{name} {key}", outputs[key.split("/", 1)[1]].numpy(), expected[key])


def _randomize_batch_norms(net, seed=0):
    """Random moving statistics, so that folding BN is actually exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
    return net.eval()


FULL_SIZE = [
    ("nasnet_mobile", 96), ("mobilenet_v1_050_160", 99), ("pnasnet_large", 90),
    pytest.param("nasnet_large", 97, marks=pytest.mark.heavy),
    pytest.param("amoebanet_a_n18_f448", 67, marks=pytest.mark.heavy),  # 468M weights
]


@pytest.mark.parametrize("name,size", FULL_SIZE)
def test_full_size_networks_equal_the_faithful_graph(name, size):
    """Every cell of the full-size networks (random weights and BN statistics), at an
    odd and an even input size (one size for the two largest): logits, features and all
    end points."""
    torch.manual_seed(0)
    net = _randomize_batch_norms(imvec.create_model(name, num_classes=1001))
    fast = optimize(net)
    sizes = (size,) if name in ("nasnet_large", "amoebanet_a_n18_f448") else (size, size + 1)
    for s in sizes:
        x = torch.rand(2, 3, s, s) * 2 - 1
        ours, theirs = {}, {}
        with torch.no_grad():
            features = net.forward_features(x, theirs)
            pooled = fast(x, ours, pre_logits=True)
            assert_close(f"{name}@{s} features", pooled.numpy(),
                         net.forward_head(features, pre_logits=True).numpy())
            assert_close(f"{name}@{s} logits", fast.fc(pooled).numpy(),
                         net.forward_head(features).numpy())
        assert sorted(ours) == sorted(theirs)
        for key in theirs:
            assert_close(f"{name}@{s} {key}", ours[key].numpy(), theirs[key].numpy())


def test_building_the_engine_leaves_the_faithful_net_untouched():
    net = _randomize_batch_norms(imvec.create_model("nasnet_mobile", num_cells=3,
                                                    num_conv_filters=12))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fast_network(net)
    after = net.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(isinstance(m, BatchNorm) for m in net.modules())


def test_variable_map_reports_the_unfolded_variables(converted):
    module = imvec.load(converted("nasnet_mobile_small"))
    module(fixture_inputs("nasnet_mobile_small"))  # builds the engine
    names = module.variable_map
    assert "cell_0/beginning_bn/moving_variance" in names
    assert "cell_0/comb_iter_0/left/bn_sep_5x5_1/gamma" in names
    assert not any(k.startswith("_inference") for k in module.state_dict())
    faithful = imvec.load(converted("nasnet_mobile_small"), engine="faithful")
    for key, value in faithful.variable_map.items():
        torch.testing.assert_close(names[key], value, rtol=0, atol=0)


def test_engine_follows_weight_changes(converted):
    """Weights written through variable_map (or load_state_dict) reach the next call."""
    images = fixture_inputs("nasnet_mobile_small")
    module = imvec.load(converted("nasnet_mobile_small"))
    reference = imvec.load(converted("nasnet_mobile_small"), engine="faithful")
    module(images)
    with torch.no_grad():
        for m in (module, reference):
            m.variable_map["cell_1/beginning_bn/gamma"].mul_(3.0)
    assert_close("after edit", module(images).numpy(), reference(images).numpy())
    module.load_state_dict(imvec.load(converted("nasnet_mobile_small")).state_dict())
    expected = np.load(FIXTURES / "nasnet_mobile_small" / "expected.npz")["features"]
    assert_close("after load_state_dict", module(images).numpy(), expected)
    edited = {name: t.clone() for name, t in reference.state_dict().items()}  # gamma x 3
    module.load_state_dict(edited, assign=True)  # new tensors in the net, none written
    assert_close("after assign=True", module(images).numpy(), reference(images).numpy())
    for m in (module, reference):  # .data bypasses the version counters: rebuild by hand
        m.variable_map["cell_1/beginning_bn/gamma"].data.mul_(0.5)
    module.rebuild_engine()
    assert_close("after rebuild_engine", module(images).numpy(), reference(images).numpy())


def test_engine_choice_and_errors(converted, monkeypatch):
    path = converted("mobilenet_v1_025_128")
    ort = "onnxruntime" if onnxruntime_available() else "fast"
    assert imvec.load(path).engine == ort  # measured faster (benchmarks/bench_models.py)
    assert imvec.load(converted("nasnet_large_small")).engine == ort
    assert imvec.load(converted("amoebanet_a_small")).engine == "fast"  # 2 GB ONNX limit
    assert imvec.load(path, trainable=True).engine == "faithful"
    monkeypatch.setenv("IMVEC_ENGINE", "fast")
    assert imvec.load(path).engine == "fast"
    assert imvec.load(path, engine="faithful").engine == "faithful"  # explicit wins
    monkeypatch.setenv("IMVEC_ENGINE", "turbo")
    with pytest.raises(ValueError, match=r"\$IMVEC_ENGINE='turbo'"):
        imvec.load(path)
    monkeypatch.delenv("IMVEC_ENGINE")
    assert imvec.load(path, engine="faithful")._inference is None
    with pytest.raises(ValueError, match="unknown engine 'turbo'"):
        imvec.load(path, engine="turbo")
    with pytest.raises(ValueError, match="trainable=False"):
        imvec.load(path, trainable=True, engine="fast")
    with pytest.raises(ValueError, match="'fast' or 'compile'"):
        optimize(imvec.load(path).net, engine="onnxruntime")


def test_gradients_to_the_images_use_the_faithful_graph(converted):
    module = imvec.load(converted("mobilenet_v1_025_128"))
    images = torch.from_numpy(fixture_inputs("mobilenet_v1_025_128")).requires_grad_()
    out = module(images)
    out.square().sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    images.grad = None  # with end points too, whichever engine gives them otherwise
    module(images, as_dict=True)["default"].square().sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_outputs_feed_a_trainable_head(converted):
    """No inference-mode tensors escape: a head on top can train."""
    module = imvec.load(converted("nasnet_mobile_small"))
    head = torch.nn.Linear(module.num_features, 3)
    loss = head(module(fixture_inputs("nasnet_mobile_small"))).sum()
    loss.backward()
    assert head.weight.grad is not None


def test_built_engines_copy_and_pickle(converted):
    """oneDNN's packed weights are dropped from copies and packed again on use."""
    module = imvec.load(converted("nasnet_mobile_small"))
    x = torch.rand(2, 3, 224, 224) * 2 - 1
    fast = fast_network(module.net)
    with torch.no_grad():
        first = fast(x)
        for twin in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
            torch.testing.assert_close(twin(x), first)
    graph = InferenceGraph(module.net)
    graph(x)
    assert graph._built is not None
    assert pickle.loads(pickle.dumps(graph))._built is None


def test_fast_graph_is_not_trainable():
    fast = fast_network(imvec.create_model("mobilenet_v1", depth_multiplier=0.25))
    assert list(fast.parameters()) == []
    assert not fast.training
    with pytest.raises(TypeError, match="no inference graph"):
        fast_network(torch.nn.Linear(2, 2))


def _mapped_bytes_of_a_fresh_block(size: int = 64 << 20) -> int:
    """How many bytes glibc serves by mmap for one ``size``-byte malloc (mallinfo2's
    ``hblkhd``: bytes in mmapped blocks): about ``size`` by default, 0 once tuned."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = MallInfo2
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(size)
    try:
        return libc.mallinfo2().hblkhd - before
    finally:
        libc.free(block)


def _glibc_with_mallinfo2() -> bool:
    import platform

    name, version = platform.libc_ver()
    return name == "glibc" and tuple(map(int, version.split(".")[:2])) >= (2, 33)


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="glibc >= 2.33 (mallinfo2) only")
def test_tune_allocator_is_reversible():
    """Run in a fresh process: a long-lived test process's heap (free chunks left by earlier
    tests) could serve the probe blocks whatever the settings."""
    import inspect
    import subprocess
    import sys
    import textwrap

    probe = textwrap.dedent(inspect.getsource(_mapped_bytes_of_a_fresh_block))
    script = probe + textwrap.dedent("""
        from imvec._system import _ALLOCATOR_TUNED, trim_allocator, tune_allocator
        assert tune_allocator(True) is True and _ALLOCATOR_TUNED[0]
        assert _mapped_bytes_of_a_fresh_block() == 0  # kept in the heap, reused
        assert tune_allocator(False) is True and not _ALLOCATOR_TUNED[0]
        trim_allocator()  # the heap still holds the freed block until trimmed
        assert _mapped_bytes_of_a_fresh_block() >= 64 << 20  # glibc's default: mmap
        assert tune_allocator(True, largest=1 << 20) is True
        trim_allocator()
        assert _mapped_bytes_of_a_fresh_block(4 << 20) >= 4 << 20  # above `largest`: mapped
        assert _mapped_bytes_of_a_fresh_block(512 << 10) == 0  # below it: heap
        print("ok")
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_fold_batch_norm_by_hand():
    """conv then BN at inference == conv with W * g/sqrt(v+eps), b = beta - m*g/sqrt(v+eps)."""
    bn = torch.nn.BatchNorm2d(2, eps=1e-3).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([2.0, 0.5]))
        bn.bias.copy_(torch.tensor([1.0, -1.0]))
        bn.running_mean.copy_(torch.tensor([0.5, 2.0]))
        bn.running_var.copy_(torch.tensor([3.999, 0.249]))
    weight = torch.ones(2, 1, 1, 1)
    folded, bias = fusion.fold_batch_norm(weight, None, bn)
    torch.testing.assert_close(folded.flatten(), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(bias, torch.tensor([0.5, -3.0]))
    half, half_bias = fusion.fold_batch_norm(weight[1:], None, bn, slice(1, 2))
    torch.testing.assert_close(half.flatten(), torch.tensor([1.0]))
    torch.testing.assert_close(half_bias, torch.tensor([-3.0]))


@pytest.mark.heavy
def test_compile_engine_matches_tf(converted):
    """engine="compile": the fast graph in standard ops under torch.compile (Inductor)."""
    name = "mobilenet_v1_025_128"
    expected = np.load(FIXTURES / name / "expected.npz")
    module = imvec.load(converted(name), engine="compile")
    assert_close("compiled features", module(fixture_inputs(name)).numpy(),
                 expected["features"])


@pytest.mark.heavy
def test_compile_engine_pads_smaller_batches(converted):
    """A batch smaller than one compiled before is padded to it, not compiled anew."""
    from torch._dynamo.utils import counters

    name = "mobilenet_v1_025_128"
    path = converted(name)
    compiled = imvec.load(path, engine="compile")
    reference = imvec.load(path, engine="fast")
    image = fixture_inputs(name)
    others = np.random.default_rng(0).random((6, *image.shape[1:]), np.float32)
    counters.clear()
    for batch in (3, 2, 7, 3, 5, 1):  # compiles 3 and 7; pads 2 -> 3, 5 -> 7, 1 -> 3
        images = np.concatenate([image, others[:batch - 1]])
        out = compiled(images).numpy()
        assert out.shape == (batch, compiled.num_features)
        assert_close(f"batch {batch}", out, reference(images).numpy())
        assert_close(f"batch {batch}, TF's image", out[:1],
                     np.load(FIXTURES / name / "expected.npz")["features"])
    assert counters["stats"]["unique_graphs"] == 2


def test_portable_graph_has_no_onednn_ops(converted):
    """What export and torch.compile see: standard ops, the same numbers."""
    name = "nasnet_mobile_small"
    expected = np.load(FIXTURES / name / "expected.npz")
    module = imvec.load(converted(name))
    portable = fast_network(module.net, portable=True)
    x = torch.from_numpy(fixture_inputs(name)).permute(0, 3, 1, 2) * 2 - 1
    with torch.no_grad():
        graph = torch.jit.trace(lambda t: portable(t, None, True), x, check_trace=False)
    kinds = {node.kind() for node in graph.graph.nodes()}
    assert not any(kind.startswith("mkldnn::") for kind in kinds)
    assert_close("portable features", graph(x).numpy(), expected["features"])
