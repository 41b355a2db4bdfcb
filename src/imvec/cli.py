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
    from imvec.weights.convert import convert_checkpoint

    path = convert_checkpoint(args.checkpoint, args.arch, args.output, dict(args.hparam))
    print(f"wrote {path}")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imvec", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    convert = sub.add_parser("convert", help="convert a TF checkpoint to safetensors",
                             description="Convert a TF checkpoint (prefix, e.g. .../model.ckpt) "
                             "into a self-describing .safetensors file.")
    convert.add_argument("checkpoint", help="TF checkpoint prefix (path without .index)")
    convert.add_argument("--arch", required=True, help="registry short name, e.g. nasnet_mobile")
    convert.add_argument("--hparam", action="append", type=_parse_hparam, default=[],
                         metavar="KEY=VALUE", help="override a hyper-parameter (repeatable)")
    convert.add_argument("-o", "--output", required=True, help="output .safetensors path")
    convert.set_defaults(func=cmd_convert)

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
