"""ferry agent: daemon, migration engine, CLI."""

import importlib.metadata


def ferry_version() -> str:
    """The installed package's version ("unknown" when run from a tree that was never installed)."""
    try:
        return importlib.metadata.version("ferry")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
