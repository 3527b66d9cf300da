"""What the subcommands share: a user error reported as one line with exit status 2, printing that survives a
closed pipe, output files written all-or-none, and the checks on a ``--model DIR`` argument."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import List, Sequence

__all__ = ["UserError", "Parser", "say", "first_line", "check_outs", "write_all", "model_dir"]


class UserError(Exception):
    """A problem with what the user asked for: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (plus a pointer to --help), exit status 2."""

    def error(self, message):  # noqa: D401 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def say(line: str = "") -> None:
    """print, but a closed pipe (``selfattn explain ... | head``) silences the rest instead of aborting the run
    before its files are written."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # later writes (and the interpreter's final flush) go nowhere


def first_line(e: BaseException) -> str:
    """An exception as one line of at most 500 characters (a message may quote a file's contents)."""
    lines = str(e).strip().splitlines()
    line = lines[0] if lines else type(e).__name__
    return line if len(line) <= 500 else line[:497] + "..."


def check_outs(outs: Sequence[str], suffixes: Sequence[str] = (".html", ".png")) -> List[Path]:
    """--out values -> paths, each with an accepted suffix and in a directory where a file can be created."""
    from ..inspect.files import check_writable  # (importing selfattn.inspect loads matplotlib: only when needed)
    paths = []
    for o in outs:
        p = Path(o)
        if p.suffix.lower() not in suffixes:
            raise UserError(f"--out {o}: expected a file name ending in {' or '.join(suffixes)}")
        try:
            check_writable(p)
        except OSError as e:
            raise UserError(f"--out {o}: cannot write there ({e.strerror or e})") from None
        paths.append(p)
    return paths


def write_all(jobs) -> None:
    """jobs: (path, write(path, tmp)) pairs. All outputs or none: each is written to a hidden sibling, renamed
    into place once every one has succeeded."""
    staged: List[tuple] = []
    try:
        for p, write in jobs:
            fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=p.suffix, dir=p.parent if str(p.parent) else ".")
            os.close(fd)
            tmp = Path(tmp)
            staged.append((tmp, p))
            write(p, tmp)
        for tmp, p in staged:
            os.replace(tmp, p)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    for p, _ in jobs:
        say(f"wrote {p}")


def model_dir(spec: str):
    """--model DIR -> (path, config.json as a dict), or a one-line UserError: the one check of a model directory
    every subcommand uses (it exists, is a directory, holds a readable config.json)."""
    from .. import models
    path = Path(spec)
    if not path.exists():
        raise UserError(f"--model {spec}: no such file or directory")
    if not path.is_dir():
        raise UserError(f"--model {spec}: not a model (expected a Hugging Face model directory with config.json, "
                        f"got a file)")
    if not (path / "config.json").is_file():
        raise UserError(f"--model {spec}: not a model (no config.json in this directory)")
    try:
        return path, models.read_config(path)
    except (ValueError, OSError) as e:
        raise UserError(f"--model {spec}: not a loadable model ({first_line(e)})") from None
