"""The ``selfattn`` command. User-facing, no math of its own: each subcommand is a module of this package (or of
the library) that prints what the library computes.

    selfattn explain "The cat sat on the mat." [--model minilm|PATH] [--layer L] [--head H] [--out F.html|F.png]
    selfattn explain speech.wav --model WHISPER_DIR [--out F.png]    # also writes F.cross.png
    selfattn explain photo.png --model VIT_DIR
    selfattn bench [--quick] [--out bench.png]
    selfattn plan --batch 1 --heads 32 --kv-heads 8 --seq 32768 --dim 128 --mask causal,window=4096

Adding a subcommand: a module with ``add_parser(subparsers)`` (which calls ``set_defaults(func=run)``) and
``run(args) -> int``, named in SUBCOMMANDS below. Nothing else changes.

A user error (empty text, text too long for the model, a model path that is missing or is not a model, an output
that cannot be written, bad plan arguments) prints one line to stderr and exits with status 2: no traceback, and
no half-written file (outputs are written to a temporary file and renamed). Any ValueError, TypeError, OSError or
OverflowError that reaches ``main`` is reported the same way: the library raises those for bad input and names
the argument or file in the message.
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

from .common import Parser, UserError, first_line

__all__ = ["main", "build_parser", "SUBCOMMANDS"]

# The registered subcommands, in --help order: module paths (relative to this package, or absolute), each with
# add_parser(subparsers) and run(args).
SUBCOMMANDS = [".explain", ".bench", ".plan", ".train", ".heads"]


def build_parser() -> Parser:
    p = Parser(prog="selfattn", description="Exact self-attention from the low level: see it, time it, plan it.")
    sub = p.add_subparsers(dest="command", parser_class=Parser)
    sub.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(name, __package__).add_parser(sub)
    sub.metavar = "{" + ",".join(sub.choices) + "}"
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"selfattn {args.command}: error: {first_line(e)}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError, OverflowError) as e:  # the library's word on bad input: one line
        print(f"selfattn {args.command}: error: {first_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"selfattn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
