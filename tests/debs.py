"""Debian packages the tests need, installed on first use: one `apt-get update` per test session.

CI runs on a clean machine where nothing installed by hand exists; a test that needs a program from
Debian (etcd from `etcd-server`, `chromium`) asks for it here. It is installed with apt-get when
missing; the test is skipped, with the reason, only where that is impossible (not root, no apt-get).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

_updated = False


def ensure(program: str, package: str) -> str:
    """The path of ``program`` (a name on PATH or an absolute path), installing Debian's ``package``
    when it is missing; pytest.skip where it cannot be installed, pytest.fail when apt-get fails."""
    global _updated
    found = _find(program)
    if found:
        return found
    if os.geteuid() != 0:
        pytest.skip(f"{program} is not installed and installing {package} needs root")
    if shutil.which("apt-get") is None:
        pytest.skip(f"{program} is not installed and there is no apt-get to install {package}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if not _updated:
        subprocess.run(["apt-get", "update", "-q"], check=False, env=env, capture_output=True, timeout=600)
        _updated = True
    # dpkg's lock may be held for a while by another install: wait for it rather than fail.
    done = subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "-q",
                           "--no-install-recommends", package], env=env, capture_output=True, text=True,
                          timeout=1200)
    found = _find(program)
    if done.returncode != 0 or not found:
        pytest.fail(f"apt-get install {package} failed: {done.stderr[-2000:]}")
    return found


def _find(program: str) -> str | None:
    if os.path.isabs(program):
        return program if os.path.exists(program) else None
    return shutil.which(program)
