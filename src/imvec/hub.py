"""A drop-in for the ``tensorflow_hub`` calls the image cards use.

Change ``import tensorflow_hub as hub`` into ``from imvec import hub`` and the cards'
snippets run on PyTorch. Outputs are torch tensors (``.numpy()`` for numpy; a trainable
module's need ``.detach().numpy()``). A module's signatures come from its card in the
registry, not from whatever graph an archive holds. What has no meaning without a TF graph
(``tf.Session``, graph collections) is listed in the README's "Coming from TF-Hub" table.

Handles resolve as in :func:`imvec.load`: converted weights in ``$IMVEC_HOME``, else a
module tensorflow_hub already downloaded (``$TFHUB_CACHE_DIR``), else the card's sources.
A local module (hub ``.tar.gz``, unpacked module or SavedModel folder, TF checkpoint) is
recognised by its variables.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imvec.loader import load as _load
from imvec.module import Module as _Module
from imvec.module import TensorInfo
from imvec.registry import Card, find_card

__all__ = ["KerasLayer", "Module", "ModuleSpec", "get_expected_image_size",
           "get_num_image_channels", "load", "load_module_spec", "resolve"]


@dataclass(frozen=True)
class ModuleSpec:
    """What ``hub.load_module_spec`` returns: a module's card, not yet its weights."""

    source: str
    card: Card

    def get_signature_names(self, tags: set[str] | None = None) -> list[str]:
        return list(self.card.signatures)

    def get_tags(self) -> list[set[str]]:
        return [set(), {"train"}]

    def get_input_info_dict(self, signature: str | None = None,
                            tags: set[str] | None = None) -> dict[str, TensorInfo]:
        return self._twin().get_input_info_dict(signature)

    def get_output_info_dict(self, signature: str | None = None,
                             tags: set[str] | None = None) -> dict[str, TensorInfo]:
        return self._twin().get_output_info_dict(signature)

    def _twin(self) -> _Module:
        """A weightless module on the meta device, enough to answer shape questions."""
        with torch.device("meta"):
            return _Module(self.card.build(), self.card, source=self.source)

    @property
    def _local(self) -> bool:
        """A file or folder that is not named by the registry (needs its card passed on)."""
        from imvec.weights.sources import is_registry_name

        return not self.source.endswith(".safetensors") and not is_registry_name(self.source)


def load_module_spec(path_or_handle: str | os.PathLike, arch: str | None = None) -> ModuleSpec:
    """The spec of a handle (or tfhub.dev URL, short name), of a ``.safetensors`` file from
    ``imvec convert``, or of a local module: hub ``.tar.gz``, unpacked hub module or
    SavedModel folder (e.g. one in ``$TFHUB_CACHE_DIR``), TF checkpoint folder or prefix.

    A local module is named by its TF-Hub cache descriptor where it has one, else by its
    variables (every one present with its shape: see :mod:`imvec.weights.recognize`);
    ``arch`` (a short name or handle) names it outright.
    """
    from imvec.weights import sources

    source = os.fspath(path_or_handle)
    if source.endswith(".safetensors"):
        from imvec.weights.convert import read_metadata

        metadata = read_metadata(source)
        variant = "classification" if metadata.get("num_classes") else None
        return ModuleSpec(source, find_card(metadata["arch"], variant))
    if arch is not None:
        return ModuleSpec(source, sources.card_for(source, arch))
    card = sources.identify(source)
    return ModuleSpec(source, card if card is not None else _recognize(source))


def _recognize(source: str) -> Card:
    from imvec.weights.recognize import recognize
    from imvec.weights.sources import open_source
    from imvec.weights.tfhub_cache import card_of_module_dir

    path = Path(source).expanduser()
    card = card_of_module_dir(path) if path.is_dir() else _converted_before(source)
    if card is not None:
        return card
    with open_source(source) as opened:
        shapes = {name: opened.tensors.shape(name) for name in opened.tensors}
    return recognize(shapes, source)


def _converted_before(source: str) -> Card | None:
    """The card a local file was converted for on an earlier run (an archive is then not
    unpacked again just to recognise it)."""
    from imvec.registry import CARDS
    from imvec.weights.convert import read_metadata
    from imvec.weights.sources import source_weights_path

    for listed in CARDS:
        card = find_card(listed.handle)
        if card.variant == "feature_vector" and source_weights_path(source, card).is_file():
            logits = read_metadata(source_weights_path(source, card)).get("num_classes")
            return find_card(card.short_name, "classification" if logits else None)
    return None


class Module(_Module):
    """``hub.Module(spec_or_handle, trainable=False, name="module", tags=None)``.

    ``variable_map`` maps the TF variable names to live tensors in TF layout (views of the
    parameters), not to ``tf.Variable`` objects; ``variables`` lists them.
    """

    def __init__(self, spec: ModuleSpec | str | os.PathLike, trainable: bool = False,
                 name: str = "module", tags: set[str] | None = None) -> None:
        spec = spec if isinstance(spec, ModuleSpec) else load_module_spec(spec)
        loaded = _load(spec.source, trainable=trainable, tags=tags, variant=spec.card.variant,
                       arch=spec.card.short_name if spec._local else None)
        super().__init__(loaded.net, loaded.card, trainable=trainable, tags=tags,
                         source=loaded.source, hparams=loaded.hparams,
                         class_names=loaded._class_names)
        self.name = name

    @property
    def variables(self) -> list[torch.Tensor]:
        """The module's variables in TF layout (live views), in ``variable_map`` order."""
        return list(self.variable_map.values())

    def export(self, path: str | os.PathLike, session: Any = None) -> Path:
        """Write the module's current weights (e.g. after fine-tuning) as a ``.safetensors``
        file that ``hub.Module(path)`` and ``imvec.load(path)`` open; the suffix is added
        when missing. TF's version writes a hub module from a ``tf.Session``; there is none
        here, so ``session`` must be left out."""
        if session is not None:
            raise ValueError("imvec has no tf.Session: call module.export(path)")
        from imvec.weights.convert import FORMAT, save_converted

        path = Path(path)
        path = path if path.suffix == ".safetensors" else path.with_name(path.name +
                                                                         ".safetensors")
        net = self.net if next(self.net.parameters()).device.type == "cpu" else \
            copy.deepcopy(self.net).cpu()
        classifier = self.card.variant == "classification"
        metadata = {"format": FORMAT, "arch": self.card.short_name,
                    "network": self.card.network,
                    "hparams": json.dumps(dict(self.hparams), sort_keys=True),
                    "num_classes": str(self.card.num_classes) if classifier else "",
                    "source": f"{self.source} (exported by hub.Module.export)",
                    "source_sha256": ""}
        return save_converted(net, path, metadata)


def get_expected_image_size(module_or_spec: _Module | ModuleSpec, signature: str | None = None,
                            input_name: str | None = None) -> list[int]:
    """[height, width] the module expects (its default size if it accepts others)."""
    return list(module_or_spec.card.input_size)


def get_num_image_channels(module_or_spec: _Module | ModuleSpec, signature: str | None = None,
                           input_name: str | None = None) -> int:
    return 3


def resolve(handle: str | os.PathLike) -> str:
    """``hub.resolve(handle)``: a local path that ``hub.Module``/``hub.load`` open, here the
    converted ``.safetensors`` file (downloaded and converted once, as ``imvec.load`` does)."""
    from imvec.weights import sources

    spec = load_module_spec(handle)
    if spec.source.endswith(".safetensors"):
        return spec.source
    if spec._local:
        return str(sources.ensure_source_weights(spec.source, spec.card))
    return str(sources.ensure_weights(spec.card))


class KerasLayer(nn.Module):
    """``hub.KerasLayer(handle, trainable=False, arguments=...)`` as an ``nn.Module``.

    ``trainable=True`` uses the training graph (tags {"train"}) while the layer is in
    training mode, as TF-Hub's KerasLayer does under Keras's learning phase; ``arguments``
    (e.g. ``dict(batch_norm_momentum=0.997)``) are passed on every call.
    """

    def __init__(self, handle: str | os.PathLike, trainable: bool = False,
                 arguments: dict[str, Any] | None = None, signature: str | None = None,
                 signature_outputs_as_dict: bool = False, output_key: str | None = None,
                 **_keras_kwargs: Any) -> None:
        super().__init__()
        self.module = _open(handle, trainable, {"train"} if trainable else None)
        self.arguments = dict(arguments or {})
        if "batch_norm_momentum" in self.arguments and signature is None:
            signature = next((s for s in self.module.get_signature_names()
                              if s.endswith("_with_bn_hparams")), None)
            if signature is None:
                raise ValueError(f"{self.module.card.handle} has no batch_norm_momentum input "
                                 "(only the v3 modules do)")
        self.signature = signature
        self.as_dict, self.output_key = signature_outputs_as_dict, output_key

    def forward(self, images: Any) -> torch.Tensor | dict[str, torch.Tensor]:
        inputs = dict(images=images, **self.arguments) if self.arguments else images
        out = self.module(inputs, signature=self.signature,
                          as_dict=self.as_dict or self.output_key is not None)
        return out[self.output_key] if self.output_key else out


class _Loaded:
    """What ``hub.load`` returns for these TF1-format modules: callable signatures."""

    def __init__(self, module: _Module) -> None:
        self.module = module
        self.signatures: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
            name: self._signature(name) for name in module.get_signature_names()}

    def _signature(self, name: str) -> Callable[..., dict[str, torch.Tensor]]:
        def call(images: Any = None, **inputs: Any) -> dict[str, torch.Tensor]:
            inputs = dict(inputs, images=images) if images is not None else inputs
            return self.module(inputs, signature=name, as_dict=True)
        return call

    def __call__(self, images: Any, **kwargs: Any) -> torch.Tensor:
        return self.module(images, **kwargs)


def load(handle: str | os.PathLike, tags: set[str] | None = None,
         options: Any = None) -> _Loaded:
    """``hub.load(handle)``: ``obj.signatures["default"](images=...)["default"]``.
    ``options`` (TF's ``tf.saved_model.LoadOptions``) has nothing to set here."""
    return _Loaded(_open(handle, bool(tags), tags))


def _open(handle: str | os.PathLike, trainable: bool, tags: set[str] | None) -> _Module:
    """For the TF2-style calls: a ``.safetensors`` file opens as ``imvec.load`` opens it
    (features, unless it is a fine-tuned classifier); anything else as ``hub.Module``."""
    if os.fspath(handle).endswith(".safetensors"):
        return _load(handle, trainable=trainable, tags=tags)
    return Module(handle, trainable=trainable, tags=tags)
