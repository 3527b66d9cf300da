"""examples/ run end to end: the context-parallel example spawns its own ranks (loopback gloo) and prints the
single-process loss beside the sharded one. float64, so the losses agree to rounding (STYLE.md #3: fixed
tolerance only for fp64): the two runs differ only in summation order.

Cost: one run of 4 processes on 1024 tokens, 2 steps (~30-45 s on 2 busy cores, most of it starting 4 Pythons).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_context_parallel_example_matches_one_process(tmp_path):
    out = tmp_path / "cp.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "context_parallel.py"), "--procs", "4", "--seq",
                        "1024", "--steps", "2", "--dtype", "float64", "--timeout", "120", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "loss (1 process)" in r.stdout and "peak RSS" in r.stdout, r.stdout
    res = json.loads(out.read_text())
    assert res["P"] == 4 and len(res["losses"]) == 2
    for a, b in zip(res["losses"], res["ref_losses"]):
        assert abs(a - b) <= 1e-10 * max(abs(b), 1.0), (res["losses"], res["ref_losses"])
    assert res["losses"][1] < res["losses"][0]  # it trains
    assert all(p > 0 for p in res["peaks"]) and len(res["peaks"]) == 4
