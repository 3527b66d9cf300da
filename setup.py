"""The build step pyproject.toml cannot say: compile the native kernel into the wheel (or, for ``pip install -e .``,
into the source tree where kernels/native.py looks for it).

The library is a plain shared object loaded with ctypes -- not a CPython extension -- so the wheel is tagged
``py3-none-<platform>``: one wheel per OS and CPU family, any Python 3 version. The compile commands live in
scripts/build_native.py (shared with scripts/build-native.sh, the dev rebuild). A failed build (no compiler, a
non-x86 CPU) warns and still installs: selfattn then runs on its torch-op kernels, and ``selfattn plan`` prints
the reason the build left in kernels/_native/build-error.txt.
"""
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import Command, Distribution, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build import build

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("selfattn_build_native", ROOT / "scripts" / "build_native.py")
build_native_py = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_native_py)

LIB_DIR = ("selfattn", "kernels", "_native")  # where kernels/native.py looks, relative to the package root


class build_native(Command):
    """Compiles csrc/ into <build_lib>/selfattn/kernels/_native/ (in place under src/ for editable installs)."""

    description = "compile selfattn's native CPU kernel (scripts/build_native.py)"
    user_options = []

    def initialize_options(self):
        self.build_lib = None
        self.editable_mode = False  # set by setuptools' editable_wheel
        self._outputs = []

    def finalize_options(self):
        self.set_undefined_options("build_py", ("build_lib", "build_lib"))

    def run(self):
        base = ROOT / "src" if self.editable_mode else Path(self.build_lib)
        out = base.joinpath(*LIB_DIR) / build_native_py.LIB_NAME
        try:
            build_native_py.build(out, log=lambda msg: print(msg, file=sys.stderr))
        except build_native_py.BuildError as e:
            if not self.editable_mode:
                out.unlink(missing_ok=True)  # a library left in build/ by an earlier build does not match these sources
            # pip shows this only with -v; selfattn plan shows the note the build left beside the library
            print(f"WARNING: selfattn's native kernel was not built ({e}); selfattn will run on its torch-op "
                  f"kernels. `selfattn plan` shows why.", file=sys.stderr)
        self._outputs = [str(p) for p in out.parent.iterdir()
                         if p.name in (build_native_py.LIB_NAME, build_native_py.ERROR_NOTE)]

    def get_outputs(self):
        return [] if self.editable_mode else self._outputs

    def get_output_mapping(self):
        return {}

    def get_source_files(self):  # what sdist must carry for this step
        return [os.path.relpath(p, ROOT) for p in sorted((ROOT / "src" / "selfattn" / "csrc").iterdir())
                if p.is_file()] + ["scripts/build_native.py"]


class build_with_native(build):
    sub_commands = build.sub_commands + [("build_native", None)]


class BinaryDistribution(Distribution):
    """Carries a compiled library: platform build folder, installed to platlib, a platform wheel."""

    def has_ext_modules(self):
        return True


class bdist_wheel_platform(bdist_wheel):
    """Any Python 3 can use the wheel: the .so does not link libpython."""

    def get_tag(self):
        _, _, plat = super().get_tag()
        return "py3", "none", plat


setup(distclass=BinaryDistribution, cmdclass={"build": build_with_native, "build_native": build_native, "bdist_wheel": bdist_wheel_platform})
