"""The ``imvec`` command: parses arguments, calls the Python API, prints results."""

from __future__ import annotations

import argparse
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


def cmd_convert(args: argparse.Namespace) -> None:
    from imvec.weights.sources import convert_source

    path = convert_source(args.source, args.output, arch=args.arch, hparams=dict(args.hparam),
                          prefer_ema=not args.no_ema)
    print(f"wrote {path}")


def cmd_download(args: argparse.Namespace) -> None:
    from imvec.registry import find_card
    from imvec.weights import sources, store

    card = find_card(args.handle, args.variant)
    if args.check:
        for mirror in card.mirrors:
            try:
                answer = store.head(mirror.url)
                status = f"HTTP {answer.status}" + (f", {answer.size} bytes" if answer.size
                                                    else "") + f" ({answer.final_url})"
            except store.DownloadError as e:
                status = f"unreachable: {e}"
            print(f"{mirror.kind:16} {mirror.url}\n{'':16} -> {status}")
        return
    path = sources.ensure_weights(card, progress=True if args.progress else None)
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
                        prefer_ema=not args.no_ema)
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

    rows = [("handle", "input", "features", "params", "weights from")]
    for card in list_models(args.include):
        with torch.device("meta"):
            params = sum(p.numel() for p in card.build().parameters())
        size = "x".join(map(str, card.input_size)) + ("+" if card.variable_input_size else "")
        out = card.num_features if card.variant == "feature_vector" else card.num_classes
        rows.append((card.handle, size, str(out), f"{params / 1e6:.1f}M",
                     ", ".join(m.kind for m in card.mirrors)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def cmd_card(args: argparse.Namespace) -> None:
    from imvec.cards import render_card
    from imvec.registry import find_card

    print(render_card(find_card(args.handle, args.variant)))


def cmd_extract(args: argparse.Namespace) -> None:
    from imvec.extract import ExtractJob, run

    job = ExtractJob(
        inputs=tuple(args.inputs), model=args.model, output=args.output, format=args.format,
        batch_size=args.batch_size, workers=args.workers, size=args.size, crop=args.crop,
        max_pixels=args.max_pixels or None, path_column=args.path_column, engine=args.engine,
        address=args.address, actors=args.actors, device=args.device,
        overwrite=args.overwrite, progress=not args.quiet, commit_every=args.commit_every,
        precision=args.precision)
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

    (found,) = neighbors([args.query], args.index, k=args.k, model=args.model)
    for rank, hit in enumerate(found, 1):
        print(f"{rank:3d}  {hit.score:.4f}  {hit.path}")


def cmd_finetune(args: argparse.Namespace) -> None:
    import dataclasses
    import logging
    import os

    from imvec.finetune import FinetuneConfig, finetune

    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    options = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    config = FinetuneConfig(**options, pretrained=not args.random_init)
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
                      central_fraction=args.central_crop)
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
    finetune = sub.add_parser(
        "finetune", help="train a classifier on your labelled images",
        description="Fine-tune a module on DATA: a new logits layer on frozen, cached features "
        "(--mode head) or the whole network on its training graph (--mode full). Writes "
        "RUN_DIR/model.safetensors (imvec.load opens it as a classifier with the class names), "
        "metrics.csv/.json/.png and a checkpoint after every epoch (--resume continues). "
        "Several GPUs or machines: launch with torchrun.")
    add = finetune.add_argument
    add("data", help="image folder (one sub-folder per class) or .csv/.parquet of path,label")
    add("--model", "-m", required=True,
        help="handle, short name, .safetensors or run directory to start from")
    add("-o", "--output", required=True, metavar="RUN_DIR", help="run directory to write")
    add("--mode", choices=("head", "full"), help="head: new logits layer on frozen features "
        "(default); full: the whole network")
    add("--epochs", type=int, help="epochs (default: head 30, full 10)")
    add("--batch-size", type=int, help="global batch size, split over processes "
        "(default: head 64, full 32)")
    add("--lr", type=float, help="peak learning rate (default: adamw 1e-3; sgd 0.005 per 32 "
        "images)")
    add("--optimizer", choices=("sgd", "adamw"), help="default: head adamw, full sgd")
    add("--momentum", type=float, help="SGD momentum (default: 0.9)")
    add("--weight-decay", type=float, help="on weights only (default: head 1e-4, full 4e-5)")
    add("--warmup-epochs", type=float, help="linear warm-up before the cosine decay "
        "(default: head 0, full 1)")
    add("--label-smoothing", type=float, help="default: 0.1")
    add("--val-data", help="validation images (folder or table); default: split DATA")
    add("--val-fraction", type=float, help="share of each class held out (default: 0.1)")
    add("--path-column", help="path column of a table (default: path)")
    add("--label-column", help="label column of a table (default: label)")
    add("--image-size", type=int, help="input size of a variable-size module (MobileNet; "
        "default: its card's)")
    add("--central-crop", dest="central_fraction", type=float, metavar="FRACTION",
        help="central crop for validation images (default: 0.875)")
    add("--augment-views", type=int, help="head mode: augmented crops cached per training "
        "image besides the central one (default: 1 = central only)")
    add("--dropout", type=float, help="dropout before the logits (default: the network's)")
    add("--drop-path-keep-prob", type=float,
        help="full mode, NAS nets: drop-path keep probability (default: the card's)")
    add("--batch-norm-momentum", type=float, help="full mode: TF decay of the BN moving "
        "averages (default: 0.99)")
    add("--grad-checkpointing", action="store_true",
        help="full mode, NAS nets: recompute activations to save memory")
    add("--sync-bn", action="store_true", help="full mode with several GPUs: batch-norm "
        "statistics over the global batch (default: per process)")
    add("--random-init", action="store_true",
        help="start from random weights instead of pretrained ones")
    add("--seed", type=int, help="seed of split, shuffling, augmentation (default: 0)")
    add("--workers", type=int, help="image decoding processes (default: 2)")
    add("--device", help="torch device (default: cuda if available, else cpu)")
    add("--precision", choices=("auto", "fp32", "bf16", "fp16"),
        help="auto: bf16 (or fp16) autocast on CUDA, fp32 on CPU")
    add("--resume", action="store_true", help="continue the run in RUN_DIR after its last "
        "completed epoch (a new RUN_DIR just starts)")
    finetune.set_defaults(func=cmd_finetune)


def _add_predict_parser(sub: Any) -> None:
    predict = sub.add_parser(
        "predict", help="top-k labels of images",
        description="Print the K most probable labels of each image, from a fine-tuned run "
        "(its class names) or a TF-Hub classification module (the 1001 ImageNet labels).")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    predict.add_argument("--model", "-m", required=True,
                         help="run directory, .safetensors with logits, or handle / short name")
    predict.add_argument("-k", type=int, default=5, help="labels per image (default: 5)")
    predict.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    predict.add_argument("--central-crop", type=float, default=0.875, metavar="FRACTION",
                         help="central crop before resizing (default: 0.875; 1 = none)")
    predict.add_argument("--json", action="store_true", help="one JSON object per line")
    predict.set_defaults(func=cmd_predict)


def _add_export_parser(sub: Any) -> None:
    export = sub.add_parser(
        "export", help="write a module as ONNX or TorchScript",
        description="Export a module's inference graph (BN folded, standard ops) with TF-Hub's "
        "contract: input 'images' [batch, height, width, 3] float32 in [0, 1], output "
        "'default'. The batch is dynamic; so are height and width for MobileNet V1.")
    export.add_argument("source", metavar="HANDLE_OR_PATH",
                        help="TF-Hub handle, short name or .safetensors file")
    export.add_argument("--format", choices=("onnx", "torchscript"), default="onnx",
                        help="onnx (opset 18, runs on ONNX Runtime) or torchscript "
                        "(torch.jit.load) (default: onnx)")
    export.add_argument("-o", "--output", required=True, help="file to write")
    export.add_argument("--variant", choices=("feature_vector", "classification"),
                        help="which twin, where the source does not say")
    export.add_argument("--random-weights", action="store_true",
                        help="random weights, offline (to try the pipeline)")
    export.set_defaults(func=cmd_export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imvec", description=__doc__)
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
    convert.add_argument("--no-ema", action="store_true",
                         help="use raw training values, not X/ExponentialMovingAverage twins")
    convert.add_argument("--hparam", action="append", type=_parse_hparam, default=[],
                         metavar="KEY=VALUE", help="override a hyper-parameter (repeatable)")
    convert.add_argument("-o", "--output", required=True, help="output .safetensors path")
    convert.set_defaults(func=cmd_convert)

    download = sub.add_parser("download", help="download and convert a handle's weights",
                              description="Download a handle's weights from its sources (tried "
                              "in order), verify, convert into the cache ($IMVEC_HOME), and "
                              "print where they are; later loads work offline.")
    download.add_argument("handle", help="TF-Hub handle, tfhub.dev URL or short name")
    download.add_argument("--variant", choices=("feature_vector", "classification"),
                          help="the twin of a short name (default: feature_vector)")
    download.add_argument("--check", action="store_true",
                          help="only ask each source (HTTP HEAD) whether it answers")
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
    add.add_argument("--variant", choices=("feature_vector", "classification"),
                     help="the twin of a short name (default: feature_vector)")
    add.add_argument("--no-ema", action="store_true",
                     help="use raw training values, not X/ExponentialMovingAverage twins")
    cache.set_defaults(func=cmd_cache)

    models = sub.add_parser("models", help="list the known handles",
                            description="List the handles with input size, features, "
                            "parameters and weight sources.")
    models.add_argument("include", nargs="?", default="*", help="fnmatch pattern")
    models.set_defaults(func=cmd_models)

    card = sub.add_parser("card", help="print a module's card (markdown)",
                          description="Print the card of a handle or short name.")
    card.add_argument("handle", help="TF-Hub handle, tfhub.dev URL or short name")
    card.add_argument("--variant", choices=("feature_vector", "classification"),
                      help="the twin of a short name (default: feature_vector)")
    card.set_defaults(func=cmd_card)

    extract = sub.add_parser(
        "extract", help="image collections to feature vectors (Parquet), resumable",
        description="Compute a feature vector for every image of INPUTS into OUT.parquet "
        "(id, path, feature). Rerunning the same command after a crash continues where it "
        "stopped; images that cannot be read go to OUT.errors.csv without stopping the job.")
    extract.add_argument("inputs", nargs="+", metavar="INPUT",
                         help="folder (recursive), glob, text file of paths, or Parquet/CSV "
                         "table with a path column")
    extract.add_argument("--model", "-m", required=True,
                         help="handle, short name or .safetensors file (as imvec.load)")
    extract.add_argument("-o", "--output", required=True, help="output .parquet (or .npy)")
    extract.add_argument("--format", choices=("parquet", "npy"),
                         help="output format (default: from the output's suffix, else parquet)")
    extract.add_argument("--batch-size", type=int,
                         help="images per forward pass (default: measured per network)")
    extract.add_argument("--workers", type=int,
                         help="decoding processes (default: one per core)")
    extract.add_argument("--size", type=int,
                         help="input size of a variable-size module (default: its card's)")
    extract.add_argument("--crop", type=float, metavar="FRACTION",
                         help="keep this central fraction before resizing, e.g. 0.875 "
                         "(default: no crop)")
    extract.add_argument("--max-pixels", type=int, default=89_478_485,
                         help="refuse larger images from their header (0 = no limit; "
                         "default: Pillow's 89478485)")
    extract.add_argument("--path-column", default="path",
                         help="column of image paths in table inputs (default: path)")
    extract.add_argument("--engine", choices=("local", "ray"), default="local",
                         help="local worker processes (default) or a Ray cluster")
    extract.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    extract.add_argument("--actors", type=int,
                         help="Ray model replicas (default: one per GPU, else one per CPU)")
    extract.add_argument("--device", help="torch device for the model (default: cuda if "
                         "available, else cpu)")
    extract.add_argument("--precision", choices=("float32", "bfloat16", "fp32", "bf16"),
                         help="bfloat16 (bf16): faster on CPUs with AVX512-BF16 or AMX, "
                         "~0.4%% error in the vectors (default: float32, TF's numbers)")
    extract.add_argument("--commit-every", type=int, default=1024, metavar="N",
                         help="commit results every N images; a crash loses at most that "
                         "much work (default: 1024)")
    extract.add_argument("--overwrite", action="store_true",
                         help="discard unfinished or finished earlier results for OUT")
    extract.add_argument("--quiet", "-q", action="store_true",
                         help="no progress bar (the summary line is still printed)")
    extract.set_defaults(func=cmd_extract)

    nearest = sub.add_parser(
        "neighbors", help="find the images most similar to a query image",
        description="Embed QUERY_IMAGE as the index was made (same model and preprocessing) "
        "and print the K nearest images of the index by cosine similarity (exact search).")
    nearest.add_argument("query", metavar="QUERY_IMAGE", help="the image to search for")
    nearest.add_argument("--index", required=True, help=".parquet or .npy from imvec extract")
    nearest.add_argument("-k", type=int, default=10, help="how many neighbors (default: 10)")
    nearest.add_argument("--model", "-m", help="the index's model, if its recorded source "
                         "is not found here (checked against its weights sha256)")
    nearest.set_defaults(func=cmd_neighbors)
    _add_finetune_parser(sub)
    _add_predict_parser(sub)
    _add_export_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ImvecError, ValueError, FileNotFoundError, OSError) as exc:
        if args.debug:
            traceback.print_exc()
        print(f"imvec {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
