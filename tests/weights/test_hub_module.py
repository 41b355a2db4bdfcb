"""TF1 hub modules and TF2 SavedModels: layout checks and the original variable names.

The TF2 fixture (tests/fixtures/savedmodel, made by TensorFlow with make_tf2_savedmodel.py)
stores the TF-Slim MobileNet weights under object paths (variables/<i>/...)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import FIXTURES, assert_close, read_manifest
from module_builders import fixture_tensors, write_tf1_hub_module

import imvec
from imvec.errors import CheckpointError
from imvec.weights.hub_module import OBJECT_GRAPH_KEY, PB, open_module, tf2_variable_names
from imvec.weights.sources import convert_source
from imvec.weights.tf_checkpoint import read_checkpoint, write_checkpoint

TF2 = FIXTURES / "savedmodel" / "mobilenet_v1_025_128_tf2"
MOBILENET = FIXTURES / "mobilenet_v1_025_128"


def test_tf2_names_are_recovered_from_the_object_graph():
    names = tf2_variable_names(TF2)
    assert set(names.values()) == set(read_manifest(MOBILENET / "variables.tsv"))
    assert all(k.startswith("variables/") and k.endswith("/.ATTRIBUTES/VARIABLE_VALUE")
               for k in names)
    assert names["variables/0/.ATTRIBUTES/VARIABLE_VALUE"] == "MobilenetV1/Conv2d_0/weights"
    # index order is network order, not name order: the mapping must come from the graph
    assert names["variables/10/.ATTRIBUTES/VARIABLE_VALUE"].startswith(
        "MobilenetV1/Conv2d_1_pointwise/")


def test_tf2_values_under_recovered_names_equal_the_original_checkpoint():
    names = tf2_variable_names(TF2)
    ours = read_checkpoint(TF2 / "variables" / "variables")
    original = read_checkpoint(MOBILENET / "model.ckpt")
    for key, name in names.items():
        np.testing.assert_array_equal(ours[key], original[name], err_msg=name)


def test_saved_model_pb_names_variables_when_the_checkpoint_does_not(tmp_path):
    copy = shutil.copytree(TF2, tmp_path / "m")
    prefix = copy / "variables" / "variables"
    tensors = read_checkpoint(prefix)
    graph = PB["TrackableObjectGraph"].FromString(tensors[OBJECT_GRAPH_KEY])
    for node in graph.nodes:
        for attribute in node.attributes:
            attribute.full_name = ""
    tensors[OBJECT_GRAPH_KEY] = graph.SerializeToString()
    write_checkpoint(prefix, tensors)
    assert tf2_variable_names(copy) == tf2_variable_names(TF2)


def test_tf2_savedmodel_converts_to_the_reference_features(tmp_path):
    out = convert_source(TF2, tmp_path / "m.safetensors", arch="mobilenet_v1_050_160",
                         hparams={"depth_multiplier": 0.25})
    module = imvec.load(out)
    expected = np.load(MOBILENET / "expected.npz")
    assert_close("TF2 SavedModel features", module(np.load(MOBILENET / "inputs.npy")).numpy(),
                 expected["features"])


def test_tf1_hub_module_layout(tmp_path):
    module = open_module(write_tf1_hub_module(tmp_path / "m", fixture_tensors(logits=False)))
    assert module.kind == "hub_tf1" and module.tags == (frozenset(), frozenset({"train"}))
    assert module.tensorflow_version == "1.15.0"
    assert open_module(TF2).kind == "saved_model_tf2"


def test_unsupported_or_broken_modules_are_named(tmp_path):
    module = write_tf1_hub_module(tmp_path / "m", {"a": np.zeros(2, np.float32)})
    (module / "tfhub_module.pb").write_bytes(PB["ModuleDef"](format=2).SerializeToString())
    with pytest.raises(CheckpointError, match="format 2"):
        open_module(module)
    (module / "saved_model.pb").write_bytes(b"\xff\xff\xff garbage")
    with pytest.raises(CheckpointError, match="not a readable SavedModel"):
        open_module(module)
    shutil.rmtree(module / "variables")
    with pytest.raises(CheckpointError, match="no variables/variables.index"):
        open_module(module)
    (module / "saved_model.pb").unlink()
    with pytest.raises(CheckpointError, match="no saved_model.pb"):
        open_module(module)
