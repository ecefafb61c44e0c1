"""proto/ is sans-IO: importing all of it pulls in no asyncio, socket, agent or vmruntime."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import proto

FORBIDDEN = ("asyncio", "socket", "_socket", "selectors", "ssl", "uvloop", "agent", "vmruntime")

_PROBE = """
import importlib, json, pkgutil, sys
import proto
for mod in pkgutil.walk_packages(proto.__path__, "proto."):
    importlib.import_module(mod.name)
print(json.dumps(sorted(sys.modules)))
"""


def test_proto_imports_no_io_or_sibling_packages() -> None:
    root = Path(proto.__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=root, capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    assert "proto.state" in loaded and "proto.auth" in loaded  # the probe really imported everything
    bad = sorted(m for m in loaded if m.split(".")[0] in FORBIDDEN)
    assert bad == [], f"proto pulled in {bad}"


def test_every_proto_module_has_a_docstring() -> None:
    import importlib

    for mod in pkgutil.walk_packages(proto.__path__, "proto."):
        module = importlib.import_module(mod.name)
        assert module.__doc__ and len(module.__doc__.strip()) > 40, mod.name
