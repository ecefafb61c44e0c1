"""The names of ferry's dirty-tracking backends, best first."""

from __future__ import annotations

UFFD_WP_ASYNC = "uffd-wp-async"
UFFD_WP_SYNC = "uffd-wp-sync"
HASH = "hash"
BACKENDS: tuple[str, ...] = (UFFD_WP_ASYNC, UFFD_WP_SYNC, HASH)


def check_backend(name: str) -> None:
    """Raise ValueError unless ``name`` is one of BACKENDS."""
    if name not in BACKENDS:
        raise ValueError(f"unknown dirty-tracking backend {name!r}; known: {', '.join(BACKENDS)}")
