"""Builds selfattn's native CPU kernel: src/selfattn/csrc/*.cc -> kernels/_native/libselfattn_native.so.

The one place the compile commands live: ``setup.py`` calls :func:`build` at ``pip install`` / ``pip wheel`` /
``pip install -e .`` time, and ``scripts/build-native.sh`` (the dev rebuild after editing csrc/) runs this file.
Standard library only (it runs inside pip's isolated build environment, before torch exists).

Plain C++17 with a C ABI (no torch headers: those take ~60 s per file), loaded by kernels/native.py through
ctypes. forward.cc and backward.cc are compiled once per instruction set (portable, AVX2+FMA, AVX-512, and the
forward once more with AVX512_BF16) into separate namespaces; dispatch.cc picks one on the *running* CPU, so
nothing here depends on the build machine's ISA (never add -march=native). The nine objects compile in parallel
(~30 s wall on 2 cores). A failed build writes its reason next to the library (``build-error.txt``), which
``selfattn plan`` prints; a successful one removes it. An unchanged build (same sources, compiler, flags) is
skipped, so rerunning is cheap.

    python scripts/build_native.py [--out PATH] [--force] [--quiet]
Environment: CXX (default g++; may carry arguments, e.g. "ccache g++"), SELFATTN_NATIVE_OUT (output path).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "selfattn" / "csrc"
LIB_NAME = "libselfattn_native.so"
DEFAULT_OUT = ROOT / "src" / "selfattn" / "kernels" / "_native" / LIB_NAME
ERROR_NOTE = "build-error.txt"  # kernels/native.py reads it when the library is missing
STAMP = "build-stamp.txt"

# -O3, FMA contraction; no -ffast-math (it would break the inf/NaN handling of masked scores)
COMMON = ["-std=c++17", "-O3", "-fPIC", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast",
          "-fvisibility=hidden", "-fno-semantic-interposition", "-Wall", "-Wno-psabi", "-Wno-unused-function"]
ISA_FLAGS = {
    "scalar": ["-DSA_VBYTES=16"],
    "avx2": ["-DSA_VBYTES=32", "-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-DSA_VBYTES=64", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
}


class BuildError(RuntimeError):
    """The library could not be built; the message says why in one line (it ends up in ``selfattn plan``)."""


def compile_commands(cxx: list, tmp: Path) -> list:
    """(object path, command) for every object of the library."""
    jobs = []
    # bf16 forward with AVX512_BF16 dot products (vdpbf16ps): a fourth build of forward.cc, used only where the
    # CPU has it
    o = tmp / "forward_avx512bf16.o"
    jobs.append((o, cxx + COMMON + ISA_FLAGS["avx512"] + ["-mavx512bf16", "-DSA_DPBF16=1", "-DSA_NS=sa_avx512bf16",
                                                         "-c", str(SRC / "forward.cc"), "-o", str(o)]))
    for isa, flags in ISA_FLAGS.items():
        for f in ("forward", "backward"):
            o = tmp / f"{f}_{isa}.o"
            jobs.append((o, cxx + COMMON + flags + [f"-DSA_NS=sa_{isa}", "-c", str(SRC / f"{f}.cc"), "-o", str(o)]))
    o = tmp / "dispatch.o"
    jobs.append((o, cxx + COMMON + ["-c", str(SRC / "dispatch.cc"), "-o", str(o)]))
    return jobs


def _fingerprint(cxx: list) -> str:
    """Sources, this file (the flags) and the compiler command: what decides the library's bytes."""
    h = hashlib.sha256()
    for p in sorted(SRC.glob("*")) + [Path(__file__).resolve()]:
        if p.is_file():
            h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(" ".join(cxx).encode())
    return h.hexdigest()


def _stamp(fp: str, out: Path) -> str:
    """The fingerprint and the library file it made (a library written by anything else does not match)."""
    try:
        st = out.stat()
    except FileNotFoundError:
        return fp + " none"
    return f"{fp} {st.st_size} {st.st_mtime_ns}"


def _compiler() -> list:
    cxx = shlex.split(os.environ.get("CXX") or "g++")
    if not cxx or shutil.which(cxx[0]) is None:
        raise BuildError(f"no C++ compiler (CXX={os.environ.get('CXX') or 'g++'} not found)")
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64", "i386", "i686"):
        raise BuildError(f"the native kernel's SIMD builds are x86-64 only (this machine: {machine})")
    return cxx


def build(out: Path = DEFAULT_OUT, force: bool = False, log=print) -> Path:
    """Compiles the library to ``out`` (atomic replace); raises BuildError (and leaves its note) on failure."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    note, stamp = out.parent / ERROR_NOTE, out.parent / STAMP
    try:
        cxx = _compiler()
        fp = _fingerprint(cxx)
        if not force and stamp.exists() and stamp.read_text().strip() == _stamp(fp, out):
            log(f"build-native: {out} is up to date")
            note.unlink(missing_ok=True)
            return out
        with tempfile.TemporaryDirectory(prefix="selfattn-native-") as d:
            tmp = Path(d)
            jobs = compile_commands(cxx, tmp)
            # all at once, as make -j would: the objects are independent and the slowest (AVX-512 backward) sets
            # the wall time
            procs = [(cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
                     for _, cmd in jobs]
            failed = []
            for cmd, p in procs:
                text, _ = p.communicate()
                if p.returncode != 0:
                    failed.append((cmd, text))
                elif text.strip():
                    log(text.rstrip())
            if failed:
                cmd, text = failed[0]
                lines = [ln for ln in text.splitlines() if "error" in ln] or text.splitlines() or ["(no output)"]
                log("\n".join(f"{' '.join(c)}\n{t}" for c, t in failed))
                raise BuildError(f"{len(failed)} of {len(jobs)} compiles failed with {' '.join(cxx)}; first: "
                                 f"{Path(cmd[cmd.index('-c') + 1]).name}: {lines[0].strip()[:300]}")
            lib = tmp / LIB_NAME
            link = cxx + ["-shared", "-pthread", "-o", str(lib)] + [str(o) for o, _ in jobs] + ["-lm"]
            r = subprocess.run(link, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if r.returncode != 0:
                log(f"{' '.join(link)}\n{r.stdout}")
                raise BuildError(f"linking failed with {' '.join(cxx)}: {r.stdout.strip()[:300]}")
            staged = out.with_name(out.name + ".tmp")
            shutil.copyfile(lib, staged)
            os.replace(staged, out)  # atomic: a process that has the old library mapped keeps it
        stamp.write_text(_stamp(fp, out) + "\n")
        note.unlink(missing_ok=True)
    except BuildError as e:
        note.write_text(f"{e}\n")
        stamp.unlink(missing_ok=True)
        raise
    except OSError as e:  # a compiler that cannot be executed, an unwritable folder
        note.write_text(f"build failed: {e}\n")
        stamp.unlink(missing_ok=True)
        raise BuildError(f"build failed: {e}") from e
    log(f"build-native: {out}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("SELFATTN_NATIVE_OUT") or DEFAULT_OUT))
    ap.add_argument("--force", action="store_true", help="rebuild even when nothing changed")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    try:
        build(a.out, force=a.force, log=(lambda *_: None) if a.quiet else print)
    except BuildError as e:
        print(f"build-native: {e}; selfattn runs without its native kernel", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
