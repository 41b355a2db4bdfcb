"""The ``imvec`` command: parses arguments, calls the Python API, prints results."""

from __future__ import annotations

import argparse
import errno
import fnmatch
import json
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from imvec.errors import ImvecError


def _parse_hparam(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


# -- options shared by several commands: one spelling, defaults and choices from the library --
# Old spellings keep working with a note on stderr: {old: new}.
RENAMED_OPTIONS = {"--central-crop": "--crop", "--image-size": "--size",
                   "--random-init": "--random-weights"}
RENAMED_VALUES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# Values that moved to another option: {option: (its old values, the option taking them)}.
MOVED_VALUES = {"--engine": (("local", "ray"), "--runner")}


def _deprecated(old: str, new: str) -> None:
    print(f"imvec: {old} is deprecated and will be removed; use {new}", file=sys.stderr)


class _OldSpelling(argparse.Action):
    """An option's old spelling: hidden from --help, stored as the new one, with a note."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("default", argparse.SUPPRESS)  # the new spelling owns the default
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        _deprecated(option_string, RENAMED_OPTIONS[option_string])
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


class _Choices(tuple):
    """An option's choices, as --help and errors list them, that also let its old values
    through to the action (:class:`_MovedValue`), which sends them where they belong."""

    def __new__(cls, choices: Sequence[str], old: Sequence[str]) -> _Choices:
        self = super().__new__(cls, choices)
        self.old = tuple(old)
        return self

    def __contains__(self, value: object) -> bool:
        return tuple.__contains__(self, value) or value in self.old


class _MovedValue(argparse.Action):
    """Stores a value, or sets an old one (:data:`MOVED_VALUES`) on the option that took it
    over, with a note."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        old, new = MOVED_VALUES[self.option_strings[0]]
        if values in old:
            _deprecated(f"{option_string} {values}", f"{new} {values}")
            setattr(namespace, new.lstrip("-").replace("-", "_"), values)
        else:
            setattr(namespace, self.dest, values)


def _option(parser: argparse.ArgumentParser, name: str, *, old: str | None = None,
            **kwargs: Any) -> None:
    """``--name`` and, where the option was renamed, its old spelling."""
    action = parser.add_argument(name, **kwargs)
    if old is not None:
        extra = {"nargs": 0, "const": True} if isinstance(action, argparse._StoreTrueAction) \
            else {"type": action.type, "metavar": action.metavar, "choices": action.choices}
        parser.add_argument(old, dest=action.dest, action=_OldSpelling, **extra)


def _default_of(function_or_class: Any, name: str) -> Any:
    """The library's default for a parameter or dataclass field: --help shows it, never
    a copy that could drift."""
    import inspect

    return inspect.signature(function_or_class).parameters[name].default


def _precision_value(text: str) -> str:
    if text in RENAMED_VALUES:
        _deprecated(f"--precision {text}", f"--precision {RENAMED_VALUES[text]}")
        return RENAMED_VALUES[text]
    return text


def _add_model(parser: argparse.ArgumentParser, what: str, required: bool = True) -> None:
    parser.add_argument("--model", "-m", required=required, help=what)


def _add_variant(parser: argparse.ArgumentParser, help_text: str) -> None:
    from imvec.loader import VARIANTS

    parser.add_argument("--variant", choices=VARIANTS, help=help_text)


def _add_engine(parser: argparse.ArgumentParser, default: str | None, shown: str,
                old_values: bool = False) -> None:
    """--engine: the inference engine, as imvec.load takes it (``shown``: the default in
    words); ``old_values``: also take those that moved to another option (extract)."""
    from imvec.engines import ENGINES

    choices, action = ENGINES, "store"
    if old_values:
        choices, action = _Choices(ENGINES, MOVED_VALUES["--engine"][0]), _MovedValue
    parser.add_argument("--engine", choices=choices, action=action, default=default,
                        help=f"inference engine (see imvec.load; default: {shown})")


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda if "
                        "available, else cpu)")


def _add_precision(parser: argparse.ArgumentParser, choices: Sequence[str], help_text: str
                   ) -> None:
    parser.add_argument("--precision", type=_precision_value, choices=tuple(choices),
                        help=help_text)


def _add_size(parser: argparse.ArgumentParser, dest: str = "size") -> None:
    _option(parser, "--size", old="--image-size", dest=dest, type=int, metavar="PIXELS",
            help="input size of a variable-size module (MobileNet; default: its card's)")


def _add_crop(parser: argparse.ArgumentParser, default: float | None, help_text: str,
              dest: str = "crop") -> None:
    shown = "no crop" if default is None else default
    _option(parser, "--crop", old="--central-crop", dest=dest, type=float, metavar="FRACTION",
            default=default, help=f"{help_text} (default: {shown}; 1 = none)")


def _add_random_weights(parser: argparse.ArgumentParser, help_text: str) -> None:
    _option(parser, "--random-weights", old="--random-init", action="store_true",
            help=help_text)


def _add_batch_and_workers(parser: argparse.ArgumentParser, batch: str, workers: str) -> None:
    parser.add_argument("--batch-size", type=int, help=batch)
    parser.add_argument("--workers", type=int, help=workers)


def _add_path_column(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--path-column", default=default,
                        help=f"column of image paths in a table input (default: {default})")


def _prefer_ema(args: argparse.Namespace) -> bool:
    """``--ema`` (``--no-ema``, the default now, is still accepted)."""
    if args.ema and args.no_ema:
        raise ValueError("--ema and --no-ema contradict each other; pass one (raw values are "
                         "the default)")
    return args.ema


def _add_ema_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ema", action="store_true",
                        help="use a TF-Slim checkpoint's X/ExponentialMovingAverage values "
                        "instead of the raw ones (the default, which TF-Hub's modules hold)")
    parser.add_argument("--no-ema", action="store_true", help=argparse.SUPPRESS)


def cmd_convert(args: argparse.Namespace) -> None:
    from imvec.weights.sources import convert_source

    path = convert_source(args.source, args.output, arch=args.arch, hparams=dict(args.hparam),
                          prefer_ema=_prefer_ema(args),
                          progress=True if args.progress else None)
    print(f"wrote {path}")


def _check_sources(card, prefer_ema: bool) -> None:
    """``download --check``: ask each source for one byte; fail when none answers."""
    from imvec.weights import sources, store

    reachable = 0
    for found in sources._tool_caches(card, prefer_ema):
        print(f"{'local':16} {found.label}\n{'':16} -> present")
        reachable += 1
    for mirror in sources._mirror_order(card, prefer_ema):
        cached = store.download_path(mirror.url)
        answer = store.probe(mirror.url)
        if answer.ok:
            status = f"HTTP {answer.status}" + (f", {answer.size} bytes" if answer.size
                                                else "") + f" ({answer.final_url})"
        else:
            status = answer.reason or f"HTTP {answer.status}"
        if cached.is_file():
            status += f"; already downloaded at {cached}"
        reachable += answer.ok or cached.is_file()
        print(f"{mirror.kind:16} [{mirror.confidence}] {mirror.url}\n{'':16} -> {status}")
    if not reachable:
        raise store.DownloadError(
            f"no source of {card.handle} is reachable from here; fetch one of the URLs above "
            f"on another machine and run `imvec cache add {card.handle} FILE`", card.url)


def cmd_download(args: argparse.Namespace) -> None:
    from imvec.registry import find_card
    from imvec.weights import sources, store

    card = find_card(args.handle, args.variant)
    prefer_ema = _prefer_ema(args)
    if args.check:
        _check_sources(card, prefer_ema)
        return
    path = sources.ensure_weights(card, prefer_ema=prefer_ema,
                                  progress=True if args.progress else None)
    for mirror in card.mirrors:
        record = store.read_record(store.download_path(mirror.url))
        if record:
            print(f"downloaded {record.url}\n  sha256 {record.sha256}, {record.size} bytes, "
                  f"at {store.download_path(mirror.url)}")
    print(f"weights: {path}")


def cmd_cache(args: argparse.Namespace) -> None:
    from imvec.weights import store

    if args.action == "add":
        _cache_add(args)
        return
    if args.action == "clear":
        parts = tuple(args.only) if args.only else ("downloads", "weights", "tmp")
        freed = store.clear_cache(parts)
        print(f"removed {', '.join(parts)} under {store.home()} ({freed / 2**20:.1f} MiB)")
        return
    entries = list(store.cache_entries())
    print(f"cache: {store.home()}")
    for entry in entries:
        print(f"{entry.kind:9} {entry.size / 2**20:9.1f} MiB  {entry.path.name}\n"
              f"{'':21}{entry.detail}")
    total = sum(e.size for e in entries)
    print(f"{len(entries)} file(s), {total / 2**20:.1f} MiB")


def _cache_add(args: argparse.Namespace) -> None:
    from imvec.weights.cache_add import add_to_cache

    done = add_to_cache(args.handle, args.source, variant=args.variant,
                        prefer_ema=_prefer_ema(args))
    print(f"imported {done.source} ({done.layout}) for {done.card.handle}\n"
          f"  sha256 {done.sha256}")
    if done.pin_matches is None:
        print("  no sha256 is pinned in the registry for this file" if done.archive else
              "  (not compared: the registry pins the sha256 of archives, not of folders)")
    elif done.pin_matches:
        print("  matches the sha256 pinned in the registry")
    else:
        for url, sha in done.pins:
            print(f"  DIFFERS from the sha256 pinned for {url}: {sha}")
    print(f"weights: {done.path}" + (" (replaced the earlier ones)" if done.replaced else ""))


def cmd_models(args: argparse.Namespace) -> None:
    import torch

    from imvec.registry import list_models

    rows = [("name", "variant", "input", "outputs", "params", "handle", "weights from")]
    cards = list_models()
    chosen = [c for c in cards if fnmatch.fnmatch(c.short_name, args.include)
              or fnmatch.fnmatch(c.handle, args.include)]
    for card in chosen:
        with torch.device("meta"):
            params = sum(p.numel() for p in card.build().parameters())
        size = "x".join(map(str, card.input_size)) + ("+" if card.variable_input_size else "")
        out = card.num_features if card.variant == "feature_vector" else card.num_classes
        rows.append((card.short_name, card.variant, size, str(out), f"{params / 1e6:.1f}M",
                     card.handle, ", ".join(dict.fromkeys(m.kind for m in card.mirrors))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def cmd_card(args: argparse.Namespace) -> None:
    from imvec.cards import render_card
    from imvec.registry import find_card

    print(render_card(find_card(args.handle, args.variant)))


def cmd_demo(args: argparse.Namespace) -> None:
    from imvec.demo import main as demo

    demo([args.dir])


def cmd_extract(args: argparse.Namespace) -> None:
    from imvec.extract import ExtractJob, run

    job = ExtractJob(
        inputs=tuple(args.inputs), model=args.model, output=args.output, format=args.format,
        batch_size=args.batch_size, workers=args.workers, size=args.size, crop=args.crop,
        max_pixels=args.max_pixels or None, path_column=args.path_column, runner=args.runner,
        engine=args.engine, address=args.address, actors=args.actors, device=args.device,
        overwrite=args.overwrite, progress=not args.quiet, commit_every=args.commit_every,
        precision=args.precision, decode_timeout=args.decode_timeout or None,
        accept_truncated=args.accept_truncated, verify_inputs=args.verify_inputs,
        shard_size=args.shard_size, relist=args.relist)
    try:
        result = run(job)
    except KeyboardInterrupt:
        print("imvec extract: interrupted; finished images are kept, rerun the same command "
              "to continue", file=sys.stderr)
        raise SystemExit(130) from None
    for note in result.notes:
        print(f"imvec extract: {note}", file=sys.stderr)
    print(f"imvec extract: {result.summary()}")


def cmd_neighbors(args: argparse.Namespace) -> None:
    from imvec.extract import neighbors

    (found,) = neighbors([args.query], args.index, k=args.k, model=args.model,
                         engine=args.engine)
    for rank, hit in enumerate(found, 1):
        print(f"{rank:3d}  {hit.score:.4f}  {hit.path}")


def cmd_finetune(args: argparse.Namespace) -> None:
    import dataclasses
    import logging
    import os

    from imvec.finetune import FinetuneConfig, finetune

    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    options = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    config = FinetuneConfig(**options, pretrained=not args.random_weights)
    if os.environ.get("RANK", "0") == "0":  # one process reports under torchrun
        logging.basicConfig(level=logging.INFO, format="imvec finetune: %(message)s")
    try:
        result = finetune(config)
    except KeyboardInterrupt:
        print(f"imvec finetune: interrupted; completed epochs are kept in {args.output}, "
              "continue with the same command plus --resume", file=sys.stderr)
        raise SystemExit(130) from None
    last = result.history[-1] if result.history else {}
    accuracy = last.get("val_accuracy")
    tail = f", validation accuracy {accuracy:.3f}" if accuracy is not None else ""
    if os.environ.get("RANK", "0") == "0":
        epochs = last.get("epoch", 0)
        print(f"imvec finetune: {len(result.class_names)} classes, {epochs} epoch"
              f"{'s' if epochs != 1 else ''}{tail}; wrote {result.model_path} (metrics: "
              f"{result.run_dir}/metrics.png)")


def cmd_predict(args: argparse.Namespace) -> None:
    from imvec.finetune import predict

    results = predict(args.images, args.model, k=args.k, batch_size=args.batch_size,
                      central_fraction=args.central_fraction, engine=args.engine)
    failed = 0
    for result in results:
        if result.error:
            failed += 1
            print(f"imvec predict: {result.path}: {result.error}", file=sys.stderr)
        elif args.json:
            print(json.dumps({"path": result.path, "labels": [
                {"label": label, "probability": round(p, 6)} for label, p in result.labels]}))
        else:
            print(result.path)
            for label, p in result.labels:
                print(f"  {p:.4f}  {label}")
    if failed:
        raise ImvecError(f"{failed} of {len(results)} images could not be read (see above)")


def cmd_export(args: argparse.Namespace) -> None:
    from imvec.export import export
    from imvec.loader import load

    module = load(args.source, variant=args.variant, pretrained=not args.random_weights)
    try:
        path = export(module, args.output, args.format)
    except ImportError as exc:
        raise ImvecError(str(exc)) from exc
    card = module.card
    size = ("any height and width >= 32" if card.variable_input_size
            else "x".join(map(str, card.input_size)))
    print(f"imvec export: wrote {path} ({args.format}; input images [batch, H, W, 3] in "
          f"[0, 1], dynamic batch, {size}; output 'default', {card.variant})")


def _add_finetune_parser(sub: Any) -> None:
    from imvec.finetune.config import MODES, OPTIMIZERS, PRECISIONS, FinetuneConfig

    finetune = sub.add_parser(
        "finetune", help="train a classifier on your labelled images",
        description="Fine-tune a module on DATA: a new logits layer on frozen, cached features "
        "(--mode head) or the whole network on its training graph (--mode full). Writes "
        "RUN_DIR/model.safetensors (imvec.load opens it as a classifier with the class names), "
        "metrics.csv/.json/.png and a checkpoint after every epoch (--resume continues). "
        "Several GPUs or machines: launch with torchrun.")
    add = finetune.add_argument
    add("data", help="image folder (one sub-folder per class) or .csv/.parquet of path,label")
    _add_model(finetune, "handle, short name, .safetensors or run directory to start from")
    add("-o", "--output", required=True, metavar="RUN_DIR", help="run directory to write")
    add("--mode", choices=MODES, help="head: new logits layer on frozen features "
        "(default); full: the whole network")
    add("--epochs", type=int, help="epochs (default: head 30, full 10)")
    _add_batch_and_workers(finetune, "global batch size, split over processes (default: head "
                           "64, full 32)", "image decoding processes (default: "
                           f"{_default_of(FinetuneConfig, 'workers')})")
    add("--lr", type=float, help="peak learning rate (default: adamw 1e-3; sgd 0.005 per 32 "
        "images)")
    add("--optimizer", choices=OPTIMIZERS, help="default: head adamw, full sgd")
    add("--momentum", type=float, help="SGD momentum (default: "
        f"{_default_of(FinetuneConfig, 'momentum')})")
    add("--weight-decay", type=float, help="on weights only (default: head 1e-4, full 4e-5)")
    add("--warmup-epochs", type=float, help="linear warm-up before the cosine decay "
        "(default: head 0, full 1)")
    add("--label-smoothing", type=float,
        help=f"default: {_default_of(FinetuneConfig, 'label_smoothing')}")
    add("--val-data", help="validation images (folder or table); default: split DATA")
    add("--val-fraction", type=float, help="share of each class held out (default: "
        f"{_default_of(FinetuneConfig, 'val_fraction')})")
    _add_path_column(finetune, _default_of(FinetuneConfig, "path_column"))
    add("--label-column", help="label column of a table (default: "
        f"{_default_of(FinetuneConfig, 'label_column')})")
    _add_size(finetune, dest="image_size")
    _add_crop(finetune, _default_of(FinetuneConfig, "central_fraction"), "central crop of "
              "validation images and of head mode's cached view", dest="central_fraction")
    add("--augment-views", type=int, help="head mode: augmented crops cached per training "
        "image besides the central one (default: 1 = central only)")
    add("--dropout", type=float, help="dropout before the logits (default: the network's)")
    add("--drop-path-keep-prob", type=float,
        help="full mode, NAS nets: drop-path keep probability (default: the card's)")
    add("--batch-norm-momentum", type=float, help="full mode: TF decay of the BN moving "
        "averages, in [0, 1] (default: 0.99)")
    add("--grad-checkpointing", action="store_true",
        help="full mode, NAS nets: recompute activations to save memory")
    add("--sync-bn", action="store_true", help="full mode with several GPUs: batch-norm "
        "statistics over the global batch (default: per process)")
    _add_random_weights(finetune, "start from random weights instead of pretrained ones")
    add("--seed", type=int, help="seed of split, shuffling, augmentation, dropout (default: "
        f"{_default_of(FinetuneConfig, 'seed')})")
    _add_device(finetune)
    _add_precision(finetune, PRECISIONS, "auto: bfloat16 (or float16) autocast on CUDA, "
                   "float32 on CPU (default: auto)")
    add("--resume", action="store_true", help="continue the run in RUN_DIR after its last "
        "completed epoch (a new RUN_DIR just starts)")
    finetune.set_defaults(func=cmd_finetune)


def _add_predict_parser(sub: Any) -> None:
    from imvec.finetune.predict import predict as library_predict

    predict = sub.add_parser(
        "predict", help="top-k labels of images",
        description="Print the K most probable labels of each image, from a fine-tuned run "
        "(its class names) or a TF-Hub classification module (the 1001 ImageNet labels).")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    _add_model(predict, "run directory, .safetensors with logits, or handle / short name")
    engine = _default_of(library_predict, "engine")
    _add_engine(predict, engine, engine)
    k = _default_of(library_predict, "k")
    predict.add_argument("-k", type=int, default=k, help=f"labels per image (default: {k})")
    batch = _default_of(library_predict, "batch_size")
    predict.add_argument("--batch-size", type=int, default=batch,
                         help=f"images per forward pass (default: {batch})")
    _add_crop(predict, _default_of(library_predict, "central_fraction"),
              "central fraction kept before resizing", dest="central_fraction")
    predict.add_argument("--json", action="store_true", help="one JSON object per line")
    predict.set_defaults(func=cmd_predict)


def _add_export_parser(sub: Any) -> None:
    from imvec.export import FORMATS

    export = sub.add_parser(
        "export", help="write a module as ONNX or TorchScript",
        description="Export a module's inference graph (BN folded, standard ops) with TF-Hub's "
        "contract: input 'images' [batch, height, width, 3] float32 in [0, 1], output "
        "'default'. The batch is dynamic; so are height and width for MobileNet V1.")
    export.add_argument("source", metavar="HANDLE_OR_PATH",
                        help="TF-Hub handle, short name or .safetensors file")
    export.add_argument("--format", choices=FORMATS, default=FORMATS[0],
                        help="onnx (opset 18, runs on ONNX Runtime) or torchscript "
                        f"(torch.jit.load) (default: {FORMATS[0]})")
    export.add_argument("-o", "--output", required=True, help="file to write")
    _add_variant(export, "which twin, where the source does not say")
    _add_random_weights(export, "random weights, offline (to try the pipeline)")
    export.set_defaults(func=cmd_export)


def _add_extract_parser(sub: Any) -> None:
    from imvec.data.decode import DEFAULT_DECODE_TIMEOUT, DEFAULT_MAX_PIXELS
    from imvec.engines import PRECISIONS
    from imvec.engines.graph import ENV_ENGINE
    from imvec.extract.job import DEFAULT_ENGINE, FORMATS, RUNNERS, ExtractJob

    extract = sub.add_parser(
        "extract", help="image collections to feature vectors (Parquet), resumable",
        description="Compute a feature vector for every image of INPUTS into OUT.parquet "
        "(id, path, feature). Rerunning the same command after a crash continues where it "
        "stopped; images that cannot be read go to OUT.errors.csv without stopping the job.")
    extract.add_argument("inputs", nargs="+", metavar="INPUT",
                         help="folder (recursive), glob, text file of paths, Parquet/CSV "
                         "table with a path column, URL (s3://bucket/prefix/, gs://...), "
                         "WebDataset .tar shards ('shards/{00000..00099}.tar'), or an "
                         "img2dataset output folder")
    _add_model(extract, "handle, short name or .safetensors file (as imvec.load)")
    extract.add_argument("-o", "--output", required=True,
                         help="output .parquet (or .npy), or a folder: a sharded dataset")
    extract.add_argument("--format", choices=FORMATS,
                         help="output format (default: from the output's suffix, else parquet)")
    _add_batch_and_workers(extract, "images per forward pass (default: measured per network)",
                           "decoding processes (default: one per core)")
    _add_size(extract)
    _add_crop(extract, _default_of(ExtractJob, "crop"),
              "keep this central fraction before resizing, e.g. 0.875")
    extract.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                         help="refuse larger images from their header (0 = no limit; "
                         f"default: Pillow's {DEFAULT_MAX_PIXELS})")
    extract.add_argument("--decode-timeout", type=float, default=DEFAULT_DECODE_TIMEOUT,
                         metavar="SECONDS",
                         help="report an image that takes longer to decode, replacing its "
                         f"worker (0 = no limit; default: {DEFAULT_DECODE_TIMEOUT:g})")
    extract.add_argument("--accept-truncated", action="store_true",
                         help="use images whose data is cut short or corrupt (gray where "
                         "missing) instead of reporting them as failed")
    extract.add_argument("--verify-inputs", action="store_true",
                         help="also record a digest of each input file's bytes; a rerun "
                         "recomputes images whose content changed (default: size + mtime)")
    extract.add_argument("--shard-size", type=int, default=_default_of(ExtractJob, "shard_size"),
                         metavar="N", help="images per shard when -o names a folder")
    extract.add_argument("--relist", action="store_true",
                         help="output folder: list the inputs again and add new images")
    _add_path_column(extract, _default_of(ExtractJob, "path_column"))
    runner = _default_of(ExtractJob, "runner")
    extract.add_argument("--runner", choices=RUNNERS, default=runner,
                         help=f"where the job runs: worker processes here or a Ray cluster "
                         f"(default: {runner})")
    _add_engine(extract, _default_of(ExtractJob, "engine"),
                f"{DEFAULT_ENGINE}, or ${ENV_ENGINE} where set", old_values=True)
    extract.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    extract.add_argument("--actors", type=int,
                         help="Ray model replicas (default: one per GPU, else one per CPU)")
    _add_device(extract)
    _add_precision(extract, PRECISIONS, "bfloat16: faster on CPUs with AVX512-BF16 or AMX, "
                   "~0.4%% error in the vectors (default: float32, TF's numbers)")
    every = _default_of(ExtractJob, "commit_every")
    extract.add_argument("--commit-every", type=int, default=every, metavar="N",
                         help="commit results every N images; a crash loses at most that "
                         f"much work (default: {every})")
    extract.add_argument("--overwrite", action="store_true",
                         help="discard unfinished or finished earlier results for OUT")
    extract.add_argument("--quiet", "-q", action="store_true",
                         help="no progress bar (the summary line is still printed)")
    extract.set_defaults(func=cmd_extract)


def build_parser() -> argparse.ArgumentParser:
    from imvec._version import __version__

    parser = argparse.ArgumentParser(prog="imvec", description=__doc__)
    parser.add_argument("--version", action="version", version=f"imvec {__version__}",
                        help="print imvec's version and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    convert = sub.add_parser("convert", help="convert TF weights to safetensors",
                             description="Convert a SOURCE into a self-describing .safetensors "
                             "file. SOURCE: a registry handle or tfhub.dev URL (downloaded), "
                             "an http(s) URL, a .tar.gz archive, a TF1 hub module or TF2 "
                             "SavedModel directory, a directory holding one TF checkpoint, or "
                             "a checkpoint prefix (e.g. .../model.ckpt).")
    convert.add_argument("source", help="handle, URL, archive, directory or checkpoint prefix")
    convert.add_argument("--arch", help="registry short name, e.g. nasnet_mobile (required "
                         "unless SOURCE is a handle, its URL or one of its mirror URLs)")
    _add_ema_options(convert)
    convert.add_argument("--progress", action="store_true",
                         help="show a download progress bar even when stderr is not a terminal")
    convert.add_argument("--hparam", action="append", type=_parse_hparam, default=[],
                         metavar="KEY=VALUE", help="override a hyper-parameter (repeatable)")
    convert.add_argument("-o", "--output", required=True, help="output .safetensors path")
    convert.set_defaults(func=cmd_convert)

    download = sub.add_parser("download", help="download and convert a handle's weights",
                              description="Download a handle's weights from its sources (tried "
                              "in order), verify, convert into the cache ($IMVEC_HOME), and "
                              "print where they are; later loads work offline. A source that "
                              "stalls or crawls is left for the next; when none works the "
                              "command fails within about two minutes "
                              "($IMVEC_DOWNLOAD_TOTAL_S), naming each source and why.")
    download.add_argument("handle", help="TF-Hub handle, tfhub.dev URL or short name")
    _add_variant(download, "the twin of a short name (default: feature_vector)")
    download.add_argument("--check", action="store_true",
                          help="only ask each source for its first byte (a ranged GET); exit "
                          "1 when none answers")
    _add_ema_options(download)
    download.add_argument("--progress", action="store_true",
                          help="show a progress bar even when stderr is not a terminal")
    download.set_defaults(func=cmd_download)

    cache = sub.add_parser("cache", help="list, clear or add to the weights cache",
                           description="List the files in the cache ($IMVEC_HOME, default "
                           "~/.cache/imvec), delete them, or import weights fetched by hand.")
    actions = cache.add_subparsers(dest="action", required=True, metavar="ACTION",
                                   help="list, clear or add")
    actions.add_parser("list", help="show what the cache holds",
                       description="List downloads and converted weights with their sources "
                       "and sha256.")
    clear = actions.add_parser("clear", help="delete the cache",
                               description="Delete downloads, converted weights and scratch "
                               "files (never anything else under $IMVEC_HOME).")
    clear.add_argument("--only", action="append", choices=("downloads", "weights", "tmp"),
                       help="clear only this part (repeatable; default: all)")
    add = actions.add_parser(
        "add", help="import a module or checkpoint fetched by hand for a handle",
        description="Import SOURCE as the weights of HANDLE (for air-gapped machines): a hub "
        "module .tar.gz, an unpacked module or SavedModel folder, a folder holding one TF "
        "checkpoint, or a checkpoint prefix. SOURCE must hold every variable of HANDLE's "
        "network with the right shape (else nothing is imported); it is converted into the "
        "cache with its sha256 recorded. A sha256 other than the one the registry pins is "
        "reported with both values, and imported anyway.")
    add.add_argument("handle", help="TF-Hub handle, tfhub.dev URL or short name")
    add.add_argument("source", help="archive, module or checkpoint folder, or checkpoint prefix")
    _add_variant(add, "the twin of a short name (default: feature_vector)")
    _add_ema_options(add)
    cache.set_defaults(func=cmd_cache)

    models = sub.add_parser("models", help="list the known models",
                            description="List the models: the short name that imvec.load and "
                            "--model take (--variant classification for the twin), the TF-Hub "
                            "handle, input size, outputs, parameters and weight sources.")
    models.add_argument("include", nargs="?", default="*",
                        help="fnmatch pattern over names and handles (default: all)")
    models.set_defaults(func=cmd_models)

    card = sub.add_parser("card", help="print a module's card (markdown)",
                          description="Print the card of a handle or short name.")
    card.add_argument("handle", help="TF-Hub handle, tfhub.dev URL or short name")
    _add_variant(card, "the twin of a short name (default: feature_vector)")
    card.set_defaults(func=cmd_card)
    demo = sub.add_parser("demo", help="write demo images and demo weights (offline)",
                          description="Write DIR/images/ (41 files, one broken on purpose) and "
                          "DIR/nasnet_mobile_small.safetensors: weights made from the test "
                          "fixtures (reduced NASNet-A mobile, seeded random values), NOT "
                          "ImageNet weights; for trying `imvec extract` offline.")
    demo.add_argument("dir", metavar="DIR", nargs="?", default="demo",
                      help="where to write them (default: demo)")
    demo.set_defaults(func=cmd_demo)
    _add_extract_parser(sub)

    from imvec.engines.graph import ENV_ENGINE
    from imvec.extract.job import DEFAULT_ENGINE
    from imvec.extract.neighbors import neighbors

    nearest = sub.add_parser(
        "neighbors", help="find the images most similar to a query image",
        description="Embed QUERY_IMAGE as the index was made (same model and preprocessing) "
        "and print the K nearest images of the index by cosine similarity (exact search).")
    nearest.add_argument("query", metavar="QUERY_IMAGE", help="the image to search for")
    nearest.add_argument("--index", required=True, help=".parquet or .npy from imvec extract")
    k = _default_of(neighbors, "k")
    nearest.add_argument("-k", type=int, default=k, help=f"how many neighbors (default: {k})")
    _add_model(nearest, "the index's model, if its recorded source is not found here "
               "(checked against its weights sha256)", required=False)
    _add_engine(nearest, _default_of(neighbors, "engine"),
                f"{DEFAULT_ENGINE}, or ${ENV_ENGINE} where set")
    nearest.set_defaults(func=cmd_neighbors)
    _add_finetune_parser(sub)
    _add_predict_parser(sub)
    _add_export_parser(sub)
    for command in sub.choices.values():  # `imvec extract ... --debug` works too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show tracebacks on errors")
    return parser


def _one_line(exc: BaseException) -> str:
    """What failed, why, and (where the error does not say) what to do, on one line."""
    if isinstance(exc, OSError) and not isinstance(exc, ImvecError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        fix = {errno.ENOSPC: "; free some space or write elsewhere",
               errno.EDQUOT: "; free some space or write elsewhere",
               errno.EACCES: "; check the permissions or write elsewhere",
               errno.EPERM: "; check the permissions or write elsewhere",
               errno.EROFS: "; write elsewhere"}.get(exc.errno, "")
        text = f"{exc.strerror}{where}{fix}"
    elif isinstance(exc, ImportError) and not isinstance(exc, ImvecError):
        text = f"{exc} (a missing optional dependency: see the install section of the docs)"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


# Failures a user causes or can fix; anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (ImvecError, ValueError, OSError, ImportError)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = getattr(args, "device", None)
        if device is not None:  # checked before any work: one line instead of torch's trace
            from imvec._system import resolve_device

            resolve_device(device)
        args.func(args)
    except EXPECTED_ERRORS as exc:
        if args.debug:
            traceback.print_exc()
        print(f"imvec {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print(f"imvec {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
