"""``precision="bfloat16"``: the inference engine in bfloat16 against TensorFlow's float32
numbers, and its limits (float32 in and out, inference only)."""

import numpy as np
import pytest
import torch
from conftest import FIXTURES, TF_FIXTURES, relative_error

import imvec
from imvec.engines.graph import check_engine, check_precision

# bfloat16 keeps 8 bits of mantissa (relative rounding 2**-9 ~ 0.2% per value); on the TF
# fixtures the features drift by 0.30-0.41% of their largest value, cosine >= 0.99999.
BFLOAT16_TOLERANCE, BFLOAT16_MIN_COSINE = 0.01, 0.9999


def _cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _inputs(name):
    return np.load(FIXTURES / name / "inputs.npy")


@pytest.mark.parametrize("name", list(TF_FIXTURES))
@pytest.mark.parametrize("engine", ["fast", "auto"])
def test_bfloat16_engine_matches_tf_within_its_rounding(name, engine, converted):
    expected = np.load(FIXTURES / name / "expected.npz")
    variant = "classification" if "logits" in expected else "feature_vector"
    module = imvec.load(converted(name), variant=variant, engine=engine,
                        precision="bfloat16")
    assert (module.engine, module.precision) == ("fast", "bfloat16")
    images = _inputs(name)
    features = module(images, signature="image_feature_vector")
    assert features.dtype == torch.float32
    error = relative_error(features.numpy(), expected["features"])
    assert error <= BFLOAT16_TOLERANCE, f"{name}: relative error {error:.3g}"
    # rounded for real: float32 would agree with TF to ~1e-6
    assert error > 1e-4, f"{name}: relative error {error:.3g}; did it run in float32?"
    assert _cosines(features.numpy(), expected["features"]).min() >= BFLOAT16_MIN_COSINE
    if variant == "classification":
        logits = module(images)
        assert relative_error(logits.numpy(), expected["logits"]) <= BFLOAT16_TOLERANCE
    weights = module._inference._built.state_dict().values()
    assert {w.dtype for w in weights if w.is_floating_point()} == {torch.bfloat16}
    assert next(module.net.parameters()).dtype == torch.float32  # the faithful net is kept


def test_bfloat16_end_points_are_float32_and_close_to_tf(converted):
    name = "nasnet_mobile_small"
    expected = np.load(FIXTURES / name / "expected.npz")
    module = imvec.load(converted(name), precision="bf16")
    outputs = module(_inputs(name), as_dict=True)
    maps = [key for key in expected.files if key.startswith("end_points/")]
    assert maps
    for key in maps:
        value = outputs[key.split("/", 1)[1]]
        assert value.dtype == torch.float32
        # pre-activation maps round worse than the averaged features (stem: 1.4%)
        assert relative_error(value.numpy(), expected[key]) <= 3 * BFLOAT16_TOLERANCE, key


def test_bfloat16_compile_engine(converted):
    pytest.importorskip("torch._inductor")
    name = "mobilenet_v1_025_128"
    expected = np.load(FIXTURES / name / "expected.npz")
    module = imvec.load(converted(name), engine="compile", precision="bfloat16")
    try:
        features = module(_inputs(name)).numpy()
    except Exception as exc:  # noqa: BLE001 (no C++ toolchain for Inductor here)
        pytest.skip(f"torch.compile unavailable: {exc}")
    error = relative_error(features, expected["features"])
    assert 1e-4 < error <= BFLOAT16_TOLERANCE


def test_bfloat16_engine_follows_weight_changes(converted):
    module = imvec.load(converted("mobilenet_v1_025_128"), precision="bfloat16")
    images = _inputs("mobilenet_v1_025_128")
    before = module(images)
    with torch.no_grad():
        for parameter in module.net.parameters():
            parameter.mul_(0.5)
    assert relative_error(module(images).numpy(), before.numpy()) > 0.05


def test_precision_names_and_errors():
    assert check_precision(None) == check_precision("fp32") == "float32"
    assert check_precision("bf16") == "bfloat16"
    with pytest.raises(ValueError, match="unknown precision 'float8'.*float32, bfloat16"):
        check_precision("float8")
    with pytest.raises(ValueError, match="trainable module keeps float32.*autocast"):
        check_engine("auto", True, "nasnet_mobile", "bfloat16")
    for engine in ("onnxruntime", "faithful"):
        with pytest.raises(ValueError, match=f"engine='{engine}' runs float32 only"):
            check_engine(engine, False, "nasnet_mobile", "bfloat16")
    assert check_engine("compile", False, "nasnet_mobile", "bfloat16") == "compile"


def test_auto_picks_fast_for_bfloat16_even_under_an_onnxruntime_override(monkeypatch):
    monkeypatch.setenv("IMVEC_ENGINE", "onnxruntime")
    assert check_engine("auto", False, "nasnet_mobile", "bfloat16") == "fast"
    monkeypatch.setenv("IMVEC_ENGINE", "compile")
    assert check_engine("auto", False, "nasnet_mobile", "bfloat16") == "compile"
    monkeypatch.setenv("IMVEC_ENGINE", "turbo")  # still checked under bfloat16
    with pytest.raises(ValueError, match=r"\$IMVEC_ENGINE='turbo'"):
        check_engine("auto", False, "nasnet_mobile", "bfloat16")
    monkeypatch.delenv("IMVEC_ENGINE")
    assert check_engine("auto", False, "nasnet_mobile", "bfloat16") == "fast"


def test_load_rejects_bfloat16_for_training():
    with pytest.raises(ValueError, match="precision='bfloat16' is for inference"):
        imvec.load("nasnet_mobile", pretrained=False, trainable=True, precision="bfloat16")
    module = imvec.load("nasnet_mobile", pretrained=False, trainable=True)
    assert module.precision == "float32"
