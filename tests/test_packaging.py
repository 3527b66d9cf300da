"""Installed by pip: the sdist carries the sources, the wheel built from it carries the native kernel, and a fresh
venv holding torch alone runs it.

Builds the way a release does (``python -m build``: an sdist, then the wheel from the unpacked sdist in pip's
isolated build, so neither build/ leftovers nor the checkout's own library leak in), installs the wheel into a
fresh venv that holds torch and nothing else (torch from the local pip index), and runs ``selfattn plan`` and
``attention()`` there from a temporary folder, away from src/. A wheel built from the same sdist with
``CXX=/nonexistent`` installs anyway and plan says why the native kernel is absent.

Deselected from the default suite (pyproject's ``-m "not packaging"``): it compiles the library and installs
torch, ~1.5 min of 2 CPUs. .ci/run runs it: ``pytest -m packaging tests/test_packaging.py``.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"  # requirements-dev.txt's pin: the CPU build on this disk
LIB = "selfattn/kernels/_native/libselfattn_native.so"
OPTIONAL = ("numpy", "matplotlib", "tqdm", "tokenizers", "safetensors", "transformers", "triton")

pytestmark = pytest.mark.packaging


def _run(cmd, cwd=None, env=None, timeout=900) -> str:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} exited {r.returncode}:\n{r.stdout[-4000:]}"
    return r.stdout


@pytest.fixture(scope="session")
def dists(tmp_path_factory):
    """(sdist, wheel built from that sdist)."""
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", out, ROOT])
    (sdist,) = out.glob("selfattn-*.tar.gz")
    (wheel,) = out.glob("selfattn-*.whl")
    return sdist, wheel


@pytest.fixture(scope="session")
def wheel(dists) -> Path:
    return dists[1]


@pytest.fixture(scope="session")
def venv(tmp_path_factory, wheel) -> Path:
    """A fresh venv with torch and the wheel (--no-deps: torch is the only dependency attention() needs)."""
    d = tmp_path_factory.mktemp("venv") / "venv"
    _run([sys.executable, "-m", "venv", d])
    py = d / "bin" / "python"
    _run([py, "-m", "pip", "install", "-q", TORCH])
    _run([py, "-m", "pip", "install", "-q", "--no-deps", wheel])
    return py


SMOKE = """
import importlib.util, json, sys
import torch, selfattn
from selfattn import masks
q, k, v = (torch.randn(2, 4, 100, 32, dtype=torch.float64) for _ in range(3))
out = selfattn.attention(q, k, v, mask=masks.causal())
ref = selfattn.attention(q, k, v, mask=masks.causal(), kernel="reference")
p = selfattn.plan(2, 4, 100, 100, 32, mask=masks.causal(), dtype=torch.float64)
print(json.dumps({"file": selfattn.__file__, "kernel": p.kernel, "native": dict(p.reasons)["native"],
                  "err": (out - ref).abs().max().item(),
                  "installed": [m for m in {optional} if importlib.util.find_spec(m) is not None],
                  "imported": [m for m in {optional} if m in sys.modules]}))
""".replace("{optional}", repr(list(OPTIONAL)))


def _smoke(py: Path, cwd: Path, env=None) -> dict:
    import json
    out = _run([py, "-W", "ignore", "-c", SMOKE], cwd=cwd, env=env)
    return json.loads(out.strip().splitlines()[-1])


def test_sdist_carries_what_the_build_compiles(dists):
    names = {n.split("/", 1)[1] for n in tarfile.open(dists[0]).getnames() if "/" in n}
    csrc = {f"src/selfattn/csrc/{p.name}" for p in (ROOT / "src" / "selfattn" / "csrc").iterdir()
            if p.suffix in (".cc", ".h")}
    assert csrc and csrc <= names, sorted(csrc - names)
    assert {"setup.py", "pyproject.toml", "scripts/build_native.py"} <= names
    assert not [n for n in names if "_native/" in n or n.endswith((".so", ".o"))], "a built library in the sdist"


def test_wheel_carries_the_native_library(wheel):
    # a platform wheel (it carries a .so) for any Python 3 (ctypes, no libpython): never py3-none-any
    assert re.fullmatch(r"selfattn-[^-]+-py3-none-(linux|macosx|win)_\w+\.whl", wheel.name), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert LIB in names
    assert not [n for n in names if "/csrc/" in n or n.endswith((".cc", ".h", ".o"))], "sources/objects in the wheel"
    assert "selfattn/inspect/template.html" in names


def test_fresh_venv_with_torch_alone_runs_the_native_kernel(venv, tmp_path):
    r = _smoke(venv, cwd=tmp_path)
    assert Path(r["file"]).is_relative_to(venv.parent.parent), r["file"]  # the installed copy, not src/
    assert r["kernel"] == "native" and r["native"] is None, r
    assert r["err"] < 1e-12, r
    assert r["installed"] == [], f"the venv should hold torch alone, has {r['installed']}"
    assert r["imported"] == []
    # the console script is installed and plans with the native kernel
    out = _run([venv.parent / "selfattn", "plan", "--batch", "1", "--heads", "8", "--seq", "512", "--dim", "64",
                "--mask", "causal"], cwd=tmp_path)
    assert "native" in out


def test_install_without_a_compiler_succeeds_and_plan_says_why(dists, venv, tmp_path):
    _run([venv, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path, dists[0]],
         env=dict(os.environ, CXX="/nonexistent"))
    (whl,) = tmp_path.glob("selfattn-*.whl")
    assert LIB not in zipfile.ZipFile(whl).namelist()
    target = tmp_path / "site"
    _run([venv, "-m", "pip", "install", "-q", "--no-deps", "--target", target, whl])
    r = _smoke(venv, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(target)))
    assert Path(r["file"]).is_relative_to(target), r["file"]
    assert r["kernel"] != "native" and r["err"] < 1e-12, r
    assert "no C++ compiler" in r["native"] and "/nonexistent" in r["native"], r["native"]
