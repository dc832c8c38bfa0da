"""The optional native kernel (runtime/native/experts.c), built during `pip install`.

Everything else is declared in pyproject.toml. The kernel is plain C (pthreads, no Python API:
runtime/native.py loads it with ctypes). It is tuned for the machine that builds it
(-march=native, as llama.cpp's GGML_NATIVE does; set DSEXPORT_NATIVE_ARCH, e.g. x86-64-v3 or
armv8.2-a, to build for another), falls back to portable C flags when the compiler rejects
those, and when it cannot be built at all the install still succeeds and the runtime uses
numpy instead (`dsexport run --stats` on a paged bundle, or dsexport.runtime.native.status(), says
which). DSEXPORT_NATIVE=0 skips it.
"""

import os
import platform
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

BASE_FLAGS = ["-O3", "-std=c11", "-pthread", "-fno-math-errno"]


def arch_flags() -> list[list[str]]:
    """Candidate target flags, best first; the last is none (portable)."""
    arch = os.environ.get("DSEXPORT_NATIVE_ARCH")
    if arch:
        return [[f"-march={arch}"], []]
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        return [["-mcpu=native"], ["-march=native"], []]
    return [["-march=native"], []]


class OptionalNativeBuild(build_ext):
    def build_extension(self, ext):
        if os.environ.get("DSEXPORT_NATIVE", "1") == "0":
            print("dsexport: DSEXPORT_NATIVE=0, the native expert kernel is not built", file=sys.stderr)
            return
        for flags in arch_flags():
            ext.extra_compile_args = BASE_FLAGS + flags
            try:
                super().build_extension(ext)
                return
            except Exception as exc:  # a compiler that rejects the flags, or none at all
                print(f"dsexport: building the native kernel with {flags or 'portable flags'} failed: {exc}",
                      file=sys.stderr)
        print("dsexport: the native expert kernel was not built; the runtime uses numpy for routed experts",
              file=sys.stderr)


setup(
    ext_modules=[Extension("dsexport.runtime._experts", ["runtime/native/experts.c", "runtime/native/decoder.c"],
                           depends=["runtime/native/dsx.h", "runtime/native/dsx_f32.h"],
                           extra_link_args=["-pthread", "-lm"], optional=True)],
    cmdclass={"build_ext": OptionalNativeBuild},
)
