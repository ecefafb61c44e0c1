"""proto/ is sans-IO: importing all of it pulls in no I/O, no threads, no clock, no agent or vmruntime.

Its state machines are driven by their callers (agent/ and the migration threads), which own the
sockets, the event loop, the threads and the time (docs/CONTRACTS.md).
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import proto

FORBIDDEN = ("asyncio", "socket", "_socket", "select", "selectors", "ssl", "uvloop", "threading", "time",
             "agent", "vmruntime")

_PROBE = """
import importlib, json, pkgutil, sys
before = set(sys.modules)
import proto
for mod in pkgutil.walk_packages(proto.__path__, "proto."):
    importlib.import_module(mod.name)
print(json.dumps({"before": sorted(before), "after": sorted(sys.modules)}))
"""


def _top(module: str) -> str:
    return module.split(".")[0]


def test_proto_imports_no_io_or_sibling_packages() -> None:
    """Nothing forbidden is loaded by importing proto, directly or through a dependency."""
    root = Path(proto.__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=root, capture_output=True, text=True, check=True)
    modules = json.loads(out.stdout)
    before, after = set(modules["before"]), set(modules["after"])
    assert "proto.state" in after and "proto.auth" in after  # the probe really imported everything
    bad = sorted(m for m in after - before if _top(m) in FORBIDDEN)
    assert bad == [], f"proto pulled in {bad}"


def test_no_proto_module_imports_a_forbidden_module_itself() -> None:
    """The source's own imports: the interpreter loads some forbidden modules (time) before proto,
    so the probe above cannot see proto import them."""
    for path in sorted(Path(proto.__file__).resolve().parent.rglob("*.py")):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported |= {_top(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(_top(node.module))
        assert imported.isdisjoint(FORBIDDEN), f"{path.name} imports {sorted(imported & set(FORBIDDEN))}"


def test_every_proto_module_has_a_docstring() -> None:
    import importlib

    for mod in pkgutil.walk_packages(proto.__path__, "proto."):
        module = importlib.import_module(mod.name)
        assert module.__doc__ and len(module.__doc__.strip()) > 40, mod.name
