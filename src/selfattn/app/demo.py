"""The README's first command (``bash scripts/demo.sh`` runs ``python -m selfattn.app.demo``): the CLI's two main jobs.

1. ``selfattn explain`` on a default sentence with all-MiniLM-L6-v2: a terminal summary of what each layer's
   heads attend to, an interactive page (attention.html) and a grid of one layer's heads (attention.png);
2. ``selfattn bench --quick``: selfattn against torch SDPA and a plain implementation, table + plot (bench.png).

    python -m selfattn.app.demo [--out-dir DIR] [--text "..."]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import cli
from .explain import DEFAULT_TEXT


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m selfattn.app.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="selfattn-demo", help="where the pictures go (default: ./selfattn-demo)")
    p.add_argument("--text", default=DEFAULT_TEXT, help="the sentence to explain")
    p.add_argument("--skip-bench", action="store_true", help="only the explain step")
    args = p.parse_args(argv)
    out = Path(args.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"selfattn demo: error: --out-dir {out}: cannot create it ({e.strerror or e})", file=sys.stderr)
        return 2
    steps = [["explain", args.text, "--out", str(out / "attention.html"), "--out", str(out / "attention.png")]]
    if not args.skip_bench:
        steps.append(["bench", "--quick", "--out", str(out / "bench.png")])
    for step in steps:
        print(f"\n$ selfattn {' '.join(repr(a) if ' ' in a else a for a in step)}", flush=True)
        code = cli.main(step)
        if code:
            return code
    print(f"\nOpen {out / 'attention.html'} in a browser (self-contained, works offline); pictures in {out}/.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
