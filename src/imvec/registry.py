"""One card per TF-Hub handle: the network, its input and output, and where weights live.

All cards sit in the literal table ``CARDS``; a duplicate handle or alias is an error at
import. Facts come from the TF-Hub model cards and the TF-Slim / tensorflow/tpu READMEs.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from torch import nn

from imvec.errors import UnknownHandleError
from imvec.nets.amoebanet import amoebanet_a
from imvec.nets.mobilenet_v1 import mobilenet_v1
from imvec.nets.nasnet import nasnet_large, nasnet_mobile
from imvec.nets.pnasnet import pnasnet_large

__all__ = ["CARDS", "NETWORKS", "Card", "Mirror", "build_network", "find_card", "list_models"]

NETWORKS: dict[str, Callable[..., nn.Module]] = {
    "amoebanet_a": amoebanet_a,
    "nasnet_large": nasnet_large,
    "pnasnet_large": pnasnet_large,
    "nasnet_mobile": nasnet_mobile,
    "mobilenet_v1": mobilenet_v1,
}

IMAGENET = "ImageNet (ILSVRC-2012-CLS)"
SLIM_MODELS = "https://storage.googleapis.com/download.tensorflow.org/models/"


@dataclass(frozen=True)
class Mirror:
    """One place the weights can be fetched from. ``sha256``/``size`` are None where no value
    is public (the store then records what it got). ``confidence`` says how sure it is that
    the URL serves these weights (CONFIRMED, LIKELY or UNKNOWN, see docs/weights.md);
    ``values`` what the file holds: "raw" values, "ema" (moving averages under the plain
    names), "both" (a TF-Slim checkpoint with ``X/ExponentialMovingAverage`` twins: raw are
    used unless EMA is asked for) or "unknown"."""

    url: str
    kind: str  # "hub_tf1" (TF1 hub module tar.gz), "slim_tarball" (TF-Slim checkpoint) or
    #            "saved_model_tf2" (a later TF2 SavedModel version of the same module)
    sha256: str | None = None
    size: int | None = None
    note: str = ""
    confidence: str = "UNKNOWN"
    values: str = "unknown"


@dataclass(frozen=True)
class Card:
    handle: str
    alias: str | None
    network: str
    hparams: MappingProxyType
    input_size: tuple[int, int]
    variable_input_size: bool
    num_features: int
    variant: str  # "feature_vector" or "classification"
    signatures: tuple[str, ...]
    architecture: str
    source_checkpoint: str
    paper: str
    mirrors: tuple[Mirror, ...]
    dataset: str = IMAGENET
    fine_tunable: bool = True
    license: str = "Apache-2.0"
    num_classes: int | None = None
    stats: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))

    def __deepcopy__(self, memo: dict) -> Card:
        return self  # immutable: copies of a module share their card

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        """Plain pickle cannot write the read-only mappings; they travel as dicts (so
        modules pickle: torch.save, multiprocessing)."""
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        return _card_from_state, ({**state, "hparams": dict(self.hparams),
                                   "stats": dict(self.stats)},)

    @property
    def short_name(self) -> str:
        return self.handle.split("/")[2]

    @property
    def version(self) -> int:
        return int(self.handle.rsplit("/", 1)[1])

    @property
    def url(self) -> str:
        return f"https://tfhub.dev/{self.handle}"

    def build(self, **overrides: Any) -> nn.Module:
        """The plain network with the card's hyper-parameters (and ``overrides``)."""
        return build_network(self.network, num_classes=self.num_classes,
                             **{**self.hparams, **overrides})


def _card_from_state(state: dict[str, Any]) -> Card:
    return Card(**{**state, "hparams": MappingProxyType(state["hparams"]),
                   "stats": MappingProxyType(state["stats"])})


def build_network(network: str, num_classes: int | None = None, **hparams: Any) -> nn.Module:
    if network not in NETWORKS:
        raise UnknownHandleError(f"unknown network {network!r}; known: {', '.join(NETWORKS)}")
    return NETWORKS[network](num_classes=num_classes, **hparams)


def _signatures(variant: str, version: int) -> tuple[str, ...]:
    """TF-Hub image signatures. Classification modules also compute feature vectors under
    ``image_feature_vector``; v3 modules add a ``*_with_bn_hparams`` twin of each."""
    base = ["image_feature_vector"] if variant == "feature_vector" else [
        "image_classification", "image_feature_vector"]
    twins = [f"{name}_with_bn_hparams" for name in base] if version >= 3 else []
    return ("default", *base, *twins)


def _slim(path: str, confidence: str = "UNKNOWN", sha256: str | None = None,
          size: int | None = None, note: str = "") -> Mirror:
    return Mirror(SLIM_MODELS + path, "slim_tarball", sha256, size, note or "URL from the "
                  "TF-Slim README; whether it is still served is unknown", confidence, "both")


_FAMILIES: list[dict[str, Any]] = [
    dict(short="amoebanet_a_n18_f448", version=1, network="amoebanet_a", hparams={},
         input_size=331, variable=False, num_features=7168,
         architecture="AmoebaNet-A (N=18, F=448)", checkpoint="(none public: trained with "
         "tensorflow/tpu amoeba_net and exported by its tf_hub.py)",
         paper="Real et al., Regularized Evolution for Image Classifier Architecture Search, "
         "https://arxiv.org/abs/1802.01548", slim=(), kaggle=("amoebanet", "a-n18-f448", (1,)),
         tf2=None,
         stats={"params (M)": 468.6, "top-1": "83.9% (paper, unconfirmed)"}),
    dict(short="nasnet_large", version=1, network="nasnet_large", hparams={},
         input_size=331, variable=False, num_features=4032,
         architecture="NASNet-A large (18 cells, 168 filters)",
         checkpoint="nasnet-a_large_04_10_2017/model.ckpt",
         paper="Zoph et al., Learning Transferable Architectures for Scalable Image "
         "Recognition, https://arxiv.org/abs/1707.07012",
         slim=(_slim("nasnet-a_large_04_10_2017.tar.gz"),), kaggle=("nasnet", "large", (1,)),
         tf2=5,
         stats={"params (M)": 88.9, "mult-adds (M)": 23800, "top-1": "82.7%", "top-5": "96.2%"}),
    dict(short="pnasnet_large", version=1, network="pnasnet_large", hparams={},
         input_size=331, variable=False, num_features=4320,
         architecture="PNASNet-5 large (12 cells, 216 filters)",
         checkpoint="pnasnet-5_large_2017_12_13/model.ckpt",
         paper="Liu et al., Progressive Neural Architecture Search, "
         "https://arxiv.org/abs/1712.00559",
         slim=(_slim("pnasnet-5_large_2017_12_13.tar.gz"),), kaggle=("pnasnet", "large", (1,)),
         tf2=5,
         stats={"top-1": "82.9%", "top-5": "96.2%"}),
    dict(short="nasnet_mobile", version=3, network="nasnet_mobile", hparams={},
         input_size=224, variable=False, num_features=1056,
         architecture="NASNet-A mobile (12 cells, 44 filters)",
         checkpoint="nasnet-a_mobile_04_10_2017/model.ckpt",
         paper="Zoph et al., Learning Transferable Architectures for Scalable Image "
         "Recognition, https://arxiv.org/abs/1707.07012",
         slim=(_slim("nasnet-a_mobile_04_10_2017.tar.gz"),),
         kaggle=("nasnet", "mobile", (2, 1)), tf2=5,
         stats={"params (M)": 5.3, "mult-adds (M)": 564, "top-1": "74.0%", "top-5": "91.6%"}),
    dict(short="mobilenet_v1_050_160", version=3, network="mobilenet_v1",
         hparams={"depth_multiplier": 0.5}, input_size=160, variable=True, num_features=512,
         architecture="MobileNet V1 (depth multiplier 0.50)",
         checkpoint="mobilenet_v1_2018_02_22/mobilenet_v1_0.5_160/mobilenet_v1_0.5_160.ckpt",
         paper="Howard et al., MobileNets: Efficient Convolutional Neural Networks for Mobile "
         "Vision Applications, https://arxiv.org/abs/1704.04861",
         slim=(_slim("mobilenet_v1_2018_02_22/mobilenet_v1_0.5_160.tgz", "LIKELY",
                     "fb01b76ca1fb053e5f98d297e21c6c53d0d9f6a8b02ad2e88ac22b33b2adf729",
                     note="sha256 from two independent public build recipes"),
               _slim("mobilenet_v1_2018_08_02/mobilenet_v1_0.5_160.tgz", "LIKELY",
                     size=29_958_343, note="a repack of the same checkpoint (members under "
                     "./); size and sha384 7023a17e...ef88b from the OpenVINO model zoo")),
         kaggle=("mobilenet-v1", "050-160", (2, 1)), tf2=5,
         stats={"params (M)": 1.34, "mult-adds (M)": 77, "top-1": "59.1%", "top-5": "81.9%"}),
]


# Where the weights live: docs/weights.md gives the
# evidence for each source and its confidence. In short: tfhub.dev answers 302 to Kaggle's
# signed GCS bundle (LIKELY for these handles); Kaggle numbers each TF1 variation's versions
# 1..n, so TF-Hub versions {1, 3} are Kaggle versions {1, 2} (CONFIRMED for sibling modules,
# LIKELY here; both were exported from the same checkpoint) and a missing version answers 403;
# the TF-Slim tarballs hold raw values and EMA twins; the TF2 SavedModels' variable names are
# UNKNOWN, so they come last. AmoebaNet's module holds EMA values under plain names.
_KAGGLE_API = "https://www.kaggle.com/api/v1/models/google"


def _mirrors(family: dict[str, Any], variant: str, handle: str) -> list[Mirror]:
    values = "ema" if family["network"] == "amoebanet_a" else "raw"
    mirrors = [Mirror(f"https://tfhub.dev/{handle}?tf-hub-format=compressed", "hub_tf1",
                      note="302 to Kaggle's signed GCS bundle, seen for other handles in 2026",
                      confidence="LIKELY", values=values)]
    model, variation, versions = family["kaggle"]
    for version in versions:
        sure = "CONFIRMED" if (model, variant, version) == (
            "amoebanet", "classification", 1) else "LIKELY"
        mirrors.append(Mirror(
            f"{_KAGGLE_API}/{model}/tensorFlow1/{variation}-{variant.replace('_', '-')}/"
            f"{version}/download", "hub_tf1", confidence=sure, values=values,
            note=f"Kaggle TF1 version {version} (TF-Hub v1 and v3 came from one checkpoint); "
            "Kaggle answers 403 for a version that does not exist"))
    mirrors.extend(family["slim"])
    if family["tf2"]:
        mirrors.append(Mirror(
            f"https://tfhub.dev/google/imagenet/{family['short']}/{variant}/{family['tf2']}"
            "?tf-hub-format=compressed", "saved_model_tf2",
            note="TF2 version of the module; its variable names are unknown"))
    return mirrors


def _cards() -> tuple[Card, ...]:
    cards = []
    for f in _FAMILIES:
        for variant in ("feature_vector", "classification"):
            handle = f"google/imagenet/{f['short']}/{variant}/{f['version']}"
            mirrors = _mirrors(f, variant, handle)
            cards.append(Card(
                handle=handle,
                alias=f["short"] if variant == "feature_vector" else None,
                network=f["network"],
                hparams=MappingProxyType(dict(f["hparams"])),
                input_size=(f["input_size"], f["input_size"]),
                variable_input_size=f["variable"],
                num_features=f["num_features"],
                variant=variant,
                signatures=_signatures(variant, f["version"]),
                architecture=f["architecture"],
                source_checkpoint=f["checkpoint"],
                paper=f["paper"],
                mirrors=tuple(mirrors),
                num_classes=1001 if variant == "classification" else None,
                stats=MappingProxyType(dict(f["stats"])),
            ))
    return tuple(cards)


CARDS: tuple[Card, ...] = _cards()


def _index(cards: tuple[Card, ...]) -> dict[str, Card]:
    index: dict[str, Card] = {}
    for card in cards:
        for key in filter(None, (card.handle, card.alias)):
            if key in index:
                raise RuntimeError(f"duplicate handle or alias {key!r} in the registry")
            index[key] = card
    return index


_INDEX = _index(CARDS)
_URL = re.compile(r"^(?:https?://)?(?:www\.)?tfhub\.dev/(.+?)/?(?:\?.*)?$")


def find_card(name: str, variant: str | None = None) -> Card:
    """The card for a TF-Hub handle, its tfhub.dev URL, or a short name.

    ``variant`` picks the twin of a short name (``nasnet_mobile`` + "classification");
    for a full handle it must agree with the handle.
    """
    if variant not in (None, "feature_vector", "classification"):
        raise ValueError(f"variant must be 'feature_vector' or 'classification', got {variant!r}")
    match = _URL.match(name)
    key = match.group(1) if match else name.strip("/")
    card = _INDEX.get(key)
    if card is None:
        close = difflib.get_close_matches(key, list(_INDEX), n=3, cutoff=0.4)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownHandleError(
            f"unknown model {name!r}{hint} (`imvec models` lists all {len(CARDS)} handles)")
    if variant and variant != card.variant:
        if key == card.alias:
            return _INDEX[card.handle.replace("/feature_vector/", f"/{variant}/")]
        raise ValueError(f"{card.handle} is a {card.variant} module; variant={variant!r} "
                         "contradicts it")
    return card


def list_models(include: str | list[str] = "*", exclude: str | list[str] = ()) -> list[Card]:
    """Cards whose handle or alias matches ``include`` (fnmatch) and not ``exclude``."""
    include = [include] if isinstance(include, str) else include
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)

    def matches(card: Card, patterns: list[str]) -> bool:
        names = [card.handle] + ([card.alias] if card.alias else [])
        return any(fnmatch.fnmatch(n, p) for n in names for p in patterns)

    return [c for c in CARDS if matches(c, include) and not matches(c, exclude)]
