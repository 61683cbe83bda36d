"""Shared pytest fixtures.

-- fast path implementations (``fp``) -------------------------------------------------
Every fast-path test runs against both implementations: the compiled ``ut._fastpath``
and its pure-Python twin ``ut._purepy`` (multidict's parametrised-fixture pattern).
The compiled parameter is skipped, with the reason, when the extension is not built
(``python setup.py build_ext --inplace``) -- unless ``UT_REQUIRE_EXTENSION=1`` is set
(CI, wheel tests), in which case a missing extension fails the test instead.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

from ut._testbase.tunnelkit import VARIANTS


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _compiled_fastpath() -> ModuleType:
    try:
        return importlib.import_module("ut._fastpath")
    except ImportError as exc:
        if _flag("UT_REQUIRE_EXTENSION"):
            pytest.fail(f"UT_REQUIRE_EXTENSION is set but ut._fastpath does not import: {exc}")
        pytest.skip(
            f"compiled ut._fastpath is not built ({exc}); "
            "run `python setup.py build_ext --inplace`"
        )


@pytest.fixture(scope="session")
def fp_compiled() -> ModuleType:
    """The compiled fast path ``ut._fastpath`` (skips, or fails under UT_REQUIRE_EXTENSION)."""
    return _compiled_fastpath()


@pytest.fixture(scope="session")
def fp_pure() -> ModuleType:
    """The pure-Python twin ``ut._purepy``."""
    return importlib.import_module("ut._purepy")


# Session scope: Hypothesis refuses function-scoped fixtures in @given tests.
@pytest.fixture(scope="session", params=["compiled", "pure"])
def fp(request: pytest.FixtureRequest) -> ModuleType:
    """Each fast-path implementation in turn: ``ut._fastpath`` then ``ut._purepy``."""
    if request.param == "compiled":
        return _compiled_fastpath()
    return importlib.import_module("ut._purepy")


# -- tunnel tests --------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory):
    """A throwaway PKI (CA, server and client certificates) shared by a test module."""
    from ut._testbase.certs import make_test_pki

    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(params=VARIANTS)
def loop_kind(request: pytest.FixtureRequest):
    """The event loop to run a tunnel test on (ut._testbase.tunnelkit.VARIANTS); the fast path
    is switched to the named implementation for the test's duration."""
    from ut._testbase.tunnelkit import use_implementation

    loop, impl = request.param.split("-")
    with use_implementation(impl):
        yield loop
