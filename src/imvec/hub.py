"""A drop-in for the ``tensorflow_hub`` calls the image cards use.

Change ``import tensorflow_hub as hub`` into ``from imvec import hub`` and the cards'
snippets run on PyTorch. Outputs are torch tensors (``.numpy()`` for numpy). A module's
signatures come from its card in the registry, not from whatever graph an archive holds.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from imvec.loader import load as _load
from imvec.module import Module as _Module
from imvec.module import TensorInfo
from imvec.registry import Card, find_card

__all__ = ["KerasLayer", "Module", "ModuleSpec", "get_expected_image_size",
           "get_num_image_channels", "load", "load_module_spec"]


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


def load_module_spec(path_or_handle: str | os.PathLike) -> ModuleSpec:
    source = os.fspath(path_or_handle)
    if source.endswith(".safetensors"):
        from imvec.weights.convert import read_metadata

        metadata = read_metadata(source)
        variant = "classification" if metadata.get("num_classes") else None
        return ModuleSpec(source, find_card(metadata["arch"], variant))
    return ModuleSpec(source, find_card(source))


class Module(_Module):
    """``hub.Module(spec_or_handle, trainable=False, name="module", tags=None)``."""

    def __init__(self, spec: ModuleSpec | str | os.PathLike, trainable: bool = False,
                 name: str = "module", tags: set[str] | None = None) -> None:
        spec = spec if isinstance(spec, ModuleSpec) else load_module_spec(spec)
        loaded = _load(spec.source, trainable=trainable, tags=tags, variant=spec.card.variant)
        super().__init__(loaded.net, loaded.card, trainable=trainable, tags=tags,
                         source=loaded.source, hparams=loaded.hparams)
        self.name = name

    @property
    def variables(self) -> list[torch.Tensor]:
        """The module's variables in TF layout (live views), in ``variable_map`` order."""
        return list(self.variable_map.values())


def get_expected_image_size(module_or_spec: _Module | ModuleSpec, signature: str | None = None,
                            input_name: str | None = None) -> list[int]:
    """[height, width] the module expects (its default size if it accepts others)."""
    return list(module_or_spec.card.input_size)


def get_num_image_channels(module_or_spec: _Module | ModuleSpec, signature: str | None = None,
                           input_name: str | None = None) -> int:
    return 3


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
        self.module = _load(handle, trainable=trainable, tags={"train"} if trainable else None)
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


def load(handle: str | os.PathLike, tags: set[str] | None = None) -> _Loaded:
    """``hub.load(handle)``: ``obj.signatures["default"](images=...)["default"]``."""
    return _Loaded(_load(handle, trainable=bool(tags), tags=tags))
