"""Builders for download tests: TF1 hub modules, TF-Slim-like tarballs and registry cards
shrunk to the fixtures' sizes, all made from the reference checkpoints (no TensorFlow)."""

from __future__ import annotations

import dataclasses
import io
import tarfile
from pathlib import Path
from types import MappingProxyType

import numpy as np

from imvec import registry
from imvec.weights.hub_module import PB
from imvec.weights.tf_checkpoint import read_checkpoint, write_checkpoint

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SMALL = {"nasnet_mobile": {"num_cells": 3, "num_conv_filters": 12}}


def fixture_tensors(name: str = "nasnet_mobile_small", logits: bool = True) -> dict:
    """The reference checkpoint's tensors (written by the original TF-Slim code)."""
    tensors = read_checkpoint(FIXTURES / name / "model.ckpt")
    if not logits:
        tensors = {k: v for k, v in tensors.items() if not k.startswith("final_layer/")}
    return tensors


def write_tf1_hub_module(directory: Path, tensors: dict[str, np.ndarray]) -> Path:
    """A TF1 hub module directory as hub's exporter lays it out: tfhub_module.pb (format 3),
    saved_model.pb with the ``{}`` and ``{"train"}`` graphs, variables/variables.*, assets/."""
    directory.mkdir(parents=True)
    (directory / "tfhub_module.pb").write_bytes(PB["ModuleDef"](format=3).SerializeToString())
    graphs = [PB["MetaGraphDef"](meta_info_def=PB["MetaInfoDef"](
        tags=tags, tensorflow_version="1.15.0", meta_graph_version="v1.15.0"))
        for tags in ([], ["train"])]
    saved = PB["SavedModel"](saved_model_schema_version=1, meta_graphs=graphs)
    (directory / "saved_model.pb").write_bytes(saved.SerializeToString())
    write_checkpoint(directory / "variables" / "variables", tensors)
    (directory / "assets").mkdir()
    return directory


def tar_directory(directory: Path, archive: Path, root: str = ".") -> bytes:
    """A .tar.gz of ``directory`` with members under ``root`` (``.`` as tfhub.dev serves)."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(directory, arcname=root)
    return archive.read_bytes()


def hub_archive(tmp: Path, logits: bool = False, name: str = "module") -> bytes:
    """tar.gz bytes of a TF1 hub module holding the nasnet_mobile_small reference weights."""
    module = write_tf1_hub_module(tmp / name, fixture_tensors(logits=logits))
    return tar_directory(module, tmp / f"{name}.tar.gz")


def slim_tarball(tmp_path: Path, num_shards: int = 3) -> tuple:
    """Like a TF-Slim release: a top-level folder, the checkpoint in several shards, raw
    values (the reference weights) and EMA twins that differ from them."""
    tensors = fixture_tensors()
    ema = {}
    for name, value in tensors.items():
        if value.dtype == np.float32 and not name.endswith(("moving_mean", "moving_variance")):
            ema[name + "/ExponentialMovingAverage"] = value * np.float32(1.1)
    folder = tmp_path / "nasnet-a_mobile_04_10_2017"
    write_checkpoint(folder / "model.ckpt", {**tensors, **ema, "global_step": np.int64(7)},
                     num_shards=num_shards)
    (folder / "model.ckpt.meta").write_bytes(b"graph, never read")
    archive = tmp_path / "nasnet-a_mobile_04_10_2017.tar.gz"
    tar_directory(folder, archive, root=folder.name)
    return archive, ema


def malicious_tar(path: Path, *members: tarfile.TarInfo, payload: bytes = b"x") -> Path:
    """A tar.gz with a harmless first file, then ``members`` (regular ones get ``payload``)."""
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("model.ckpt.index")
        ok.size = 3
        tar.addfile(ok, io.BytesIO(b"abc"))
        for member in members:
            if member.isreg():
                member.size = len(payload)
                tar.addfile(member, io.BytesIO(payload))
            else:
                tar.addfile(member)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def shrink_card(monkeypatch, short: str = "nasnet_mobile", **changes) -> None:
    """Give both cards of ``short`` the fixture's hyper-parameters (and ``changes``, e.g.
    mirrors) in the registry index, so handles resolve to networks the fixtures fit."""
    for card in registry.CARDS:
        if card.short_name == short:
            small = dataclasses.replace(card, hparams=MappingProxyType(SMALL[short]), **changes)
            for key in filter(None, (card.handle, card.alias)):
                monkeypatch.setitem(registry._INDEX, key, small)


def shrink_card_in_process(short: str = "nasnet_mobile") -> None:
    """``shrink_card`` for a child process (no monkeypatch there)."""
    for card in registry.CARDS:
        if card.short_name == short:
            small = dataclasses.replace(card, hparams=MappingProxyType(SMALL[short]))
            for key in filter(None, (card.handle, card.alias)):
                registry._INDEX[key] = small
