"""Tools a test needs: skip without them, or fail when CI says they must be there.

``require_tools("nginx", "curl")`` skips the calling test with the list of what is
missing (and the Debian packages that have it); with ``UT_REQUIRE_E2E=1`` (CI) the same
is a failure, so such tests always run there.
"""

from __future__ import annotations

import os
import shutil

import pytest

__all__ = ["require_tools"]

# Where Debian installs what PATH may not hold for a non-root user.
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
_PACKAGES = {"nginx": "nginx-light", "tinyproxy": "tinyproxy", "openssl": "openssl",
             "curl": "curl"}


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    return next((p for d in _SBIN if os.access(p := os.path.join(d, name), os.X_OK)), None)


def require_tools(*names: str) -> None:
    missing = [n for n in names if find_tool(n) is None]
    if not missing:
        return
    pkgs = ", ".join(_PACKAGES.get(n, n) for n in missing)
    msg = f"not installed: {', '.join(missing)} (Debian: {pkgs})"
    if os.environ.get("UT_REQUIRE_E2E", "") not in ("", "0"):
        pytest.fail(msg + " (UT_REQUIRE_E2E=1 turns this skip into a failure)", pytrace=False)
    pytest.skip(msg)
