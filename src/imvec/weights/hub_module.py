"""TF-Hub module directories: where their weights are and what the weights are called.

Two layouts reach us:

- **TF1 hub modules** (``hub.Module``, the handles in the registry): ``tfhub_module.pb``
  (a ``ModuleDef``, format 3), ``saved_model.pb`` (one MetaGraphDef per tag set, ``{}`` and
  ``{"train"}``) and ``variables/variables.{index,data-*}``, a TF checkpoint whose keys are
  the variable names of the original graph (``cell_0/1x1/weights``).
- **TF2 SavedModels** (Kaggle's later versions of four of the modules): the checkpoint keys
  are object paths (``variables/0/.ATTRIBUTES/VARIABLE_VALUE``). The original names are
  recovered from the checkpoint's own object graph (``_CHECKPOINTABLE_OBJECT_GRAPH``, a
  ``TrackableObjectGraph`` whose attributes carry each variable's ``full_name``), and, for
  any variable it leaves unnamed, from ``saved_model.pb``'s ``SavedObjectGraph``
  (``SavedVariable.name``).

The few protobuf messages needed are declared at runtime with only the fields read here;
unknown fields are skipped by protobuf itself, so no generated ``_pb2`` module or protoc is
needed and no wire format is parsed by hand.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from imvec.errors import CheckpointError, summarize_names
from imvec.weights.tf_checkpoint import CheckpointReader

__all__ = ["PB", "HubModule", "open_module", "tf2_variable_names"]

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_T = descriptor_pb2.FieldDescriptorProto
# message -> [(number, name, scalar type or message name, repeated)]
_SPEC: dict[str, list[tuple[int, str, int | str, bool]]] = {
    "ModuleDef": [(1, "format", _T.TYPE_INT32, False)],
    "SavedModel": [(1, "saved_model_schema_version", _T.TYPE_INT64, False),
                   (2, "meta_graphs", "MetaGraphDef", True)],
    # graph_def is kept as raw bytes: same wire format as the GraphDef message, never parsed.
    "MetaGraphDef": [(1, "meta_info_def", "MetaInfoDef", False),
                     (2, "graph_def", _T.TYPE_BYTES, False),
                     (7, "object_graph_def", "SavedObjectGraph", False)],
    "MetaInfoDef": [(1, "meta_graph_version", _T.TYPE_STRING, False),
                    (4, "tags", _T.TYPE_STRING, True),
                    (5, "tensorflow_version", _T.TYPE_STRING, False)],
    "SavedObjectGraph": [(1, "nodes", "SavedObject", True)],
    "SavedObject": [(1, "children", "ObjectReference", True),
                    (7, "variable", "SavedVariable", False)],
    "SavedVariable": [(1, "dtype", _T.TYPE_INT32, False), (6, "name", _T.TYPE_STRING, False)],
    "ObjectReference": [(1, "node_id", _T.TYPE_INT32, False),
                        (2, "local_name", _T.TYPE_STRING, False)],
    "TrackableObjectGraph": [(1, "nodes", "TrackableObject", True)],
    "TrackableObject": [(1, "children", "ObjectReference", True),
                        (2, "attributes", "SerializedTensor", True)],
    "SerializedTensor": [(1, "name", _T.TYPE_STRING, False),
                         (2, "full_name", _T.TYPE_STRING, False),
                         (3, "checkpoint_key", _T.TYPE_STRING, False)],
}


def _declare(package: str, spec: dict) -> dict[str, type]:
    """Message classes for ``spec``, in a private pool so TensorFlow's own protos never clash."""
    f = descriptor_pb2.FileDescriptorProto(name=f"{package}.proto", package=package,
                                           syntax="proto3")
    for name, fields in spec.items():
        message = f.message_type.add(name=name)
        for number, field, kind, repeated in fields:
            fd = message.field.add(name=field, number=number,
                                   label=_T.LABEL_REPEATED if repeated else _T.LABEL_OPTIONAL)
            if isinstance(kind, str):
                fd.type, fd.type_name = _T.TYPE_MESSAGE, f".{package}.{kind}"
            else:
                fd.type = kind
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return {n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{n}"))
            for n in spec}


PB = _declare("imvec_hub", _SPEC)


def _parse(message: str, path: Path, data: bytes | None = None):
    try:
        return PB[message].FromString(path.read_bytes() if data is None else data)
    except (DecodeError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable {message} ({e}); the module is "
                              "corrupt or truncated, download it again") from e


@dataclass(frozen=True)
class HubModule:
    """A module directory: its layout, tag sets, and the checkpoint holding its weights."""

    path: Path
    kind: str  # "hub_tf1" or "saved_model_tf2"
    tags: tuple[frozenset[str], ...]
    tensorflow_version: str

    @property
    def checkpoint_prefix(self) -> Path:
        return self.path / "variables" / "variables"


def open_module(directory: str | os.PathLike) -> HubModule:
    """Recognise a TF1 hub module or a TF2 SavedModel directory, or say what is missing."""
    directory = Path(directory)
    if not (directory / "saved_model.pb").is_file():
        raise CheckpointError(f"{directory} is not a TF-Hub module or SavedModel: it has no "
                              "saved_model.pb")
    if not Path(f"{directory / 'variables' / 'variables'}.index").is_file():
        raise CheckpointError(f"{directory} has no variables/variables.index; the module is "
                              "incomplete (was it fully unpacked?)")
    saved = _parse("SavedModel", directory / "saved_model.pb")
    tags = tuple(frozenset(m.meta_info_def.tags) for m in saved.meta_graphs)
    versions = {m.meta_info_def.tensorflow_version for m in saved.meta_graphs} - {""}
    if (directory / "tfhub_module.pb").is_file():
        module_format = _parse("ModuleDef", directory / "tfhub_module.pb").format
        if module_format != 3:
            raise CheckpointError(f"{directory / 'tfhub_module.pb'} declares hub module format "
                                  f"{module_format}; imvec reads format 3 (FORMAT_V3)")
        kind = "hub_tf1"
    else:
        kind = "saved_model_tf2"
    return HubModule(directory, kind, tags, ", ".join(sorted(versions)))


def _escape(local_name: str) -> str:
    """TF's escaping of a local object name inside a checkpoint key."""
    return local_name.replace(".", "..").replace("/", ".S")


def _names_from_saved_model(directory: Path) -> dict[str, str]:
    """checkpoint key -> variable name, walking ``SavedObjectGraph`` from the root, breadth
    first, as TF does when it assigns each object the first (shortest) path to it."""
    saved = _parse("SavedModel", directory / "saved_model.pb")
    graphs = [m.object_graph_def for m in saved.meta_graphs if m.object_graph_def.nodes]
    if not graphs:
        return {}
    nodes, paths, queue = graphs[0].nodes, {0: ()}, [0]
    for node_id in queue:
        for child in nodes[node_id].children:
            if child.node_id not in paths and 0 <= child.node_id < len(nodes):
                paths[child.node_id] = (*paths[node_id], _escape(child.local_name))
                queue.append(child.node_id)
    names = {}
    for node_id, path in paths.items():
        variable = nodes[node_id].variable
        if variable.name:
            names["/".join(path) + "/.ATTRIBUTES/VARIABLE_VALUE"] = variable.name.removesuffix(
                ":0")
    return names


def tf2_variable_names(directory: str | os.PathLike) -> dict[str, str]:
    """``{checkpoint key: original variable name}`` for a TF2 SavedModel directory."""
    module = open_module(directory)
    names: dict[str, str] = {}
    with CheckpointReader(module.checkpoint_prefix) as reader:
        keys = [k for k in reader if k.endswith("/.ATTRIBUTES/VARIABLE_VALUE")]
        if OBJECT_GRAPH_KEY in reader:
            graph = _parse("TrackableObjectGraph", module.checkpoint_prefix,
                           reader.read(OBJECT_GRAPH_KEY))
            for node in graph.nodes:
                for attribute in node.attributes:
                    if attribute.name == "VARIABLE_VALUE" and attribute.full_name:
                        names[attribute.checkpoint_key] = attribute.full_name
    missing = [k for k in keys if k not in names]
    if missing:
        from_graph = _names_from_saved_model(module.path)
        names.update({k: from_graph[k] for k in missing if k in from_graph})
    unnamed = [k for k in keys if k not in names]
    if unnamed:
        raise CheckpointError(f"{module.path}: no variable name recorded for "
                              f"{len(unnamed)} checkpoint key(s): {summarize_names(unnamed)}")
    names = {k: v for k, v in names.items() if k in set(keys)}
    seen: dict[str, str] = {}
    clashes = [f"{v} ({seen[v]}, {k})" for k, v in names.items() if seen.setdefault(v, k) != k]
    if clashes:
        raise CheckpointError(f"{module.path}: several checkpoint keys carry the same variable "
                              f"name: {summarize_names(clashes)}")
    return names
