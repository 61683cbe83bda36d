"""Build the Cython fast path ``ut._fastpath``; fall back to the pure package if it cannot.

Environment switches:
  UT_NO_EXTENSIONS=1   build no extension (pure-Python package).
  UT_REQUIRE_EXTENSION=1  fail the build instead of falling back (CI sets this).
  UT_NO_MMSG=1         compile the fast path without recvmmsg/sendmmsg, as on macOS,
                       so Linux CI proves that path builds and works.
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


class OptionalBuildExt(build_ext):
    """Report which package was built; tolerate a missing compiler unless told not to."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure means "pure package"
            self._fallback(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
            print(f"ut-tunnel: built the compiled fast path {ext.name}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001
            self._fallback(exc)

    def _fallback(self, exc):
        if _flag("UT_REQUIRE_EXTENSION"):
            raise exc
        print(
            f"ut-tunnel: WARNING: could not build the fast path ({exc}); "
            "installing the pure-Python implementation",
            file=sys.stderr,
        )


def _extensions():
    if _flag("UT_NO_EXTENSIONS"):
        print("ut-tunnel: UT_NO_EXTENSIONS set, building the pure-Python package", file=sys.stderr)
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        if _flag("UT_REQUIRE_EXTENSION"):
            raise
        print("ut-tunnel: Cython missing, building the pure-Python package", file=sys.stderr)
        return []
    from setuptools import Extension

    macros = []
    if _flag("UT_NO_MMSG"):
        macros.append(("UT_NO_MMSG", "1"))
    ext = Extension(
        "ut._fastpath",
        ["ut/_fastpath.pyx"],
        # The hand-written C (uvloop's includes/ layout): cythonize tracks the .pxd/.pxi
        # files, but a header only changes the C compile, so name it here.
        depends=["ut/includes/mmsg.h"],
        define_macros=macros,
        extra_compile_args=["-O2"],
    )
    return cythonize(
        [ext],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
        compile_time_env={"UT_NO_MMSG": _flag("UT_NO_MMSG")},
    )


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
