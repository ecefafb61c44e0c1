"""Translated guest blocks this host's VM processes made, kept for the next incoming migration.

A migration's destination translates the guest's blocks before the resume (vmruntime/warmup.py),
but a small guest's pre-copy can end before that is done. The translation of a block depends only
on the guest's code, its place and the RAM size, so the blocks a VM process translated here serve
any later VM with the same code on this host: when a VM migrates away, its source agent keeps
the marshalled blocks its VM process reports (op ``blocks``); when a VM with the same code
arrives, the agent hands them to the incoming VM process, which loads instead of translating.

They never leave the host: the code hint that crosses the network carries guest code and PCs,
never Python code (a peer's bytecode would run outside the guest's sandbox). Within the host
they pass from one VM process to another through the agent, which never loads them; a VM process
loads only blocks with its own COMPILER_TAG (vmruntime/interp.py). Bounded in bytes, least
recently used out first; safe to share between session threads.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence

MAX_CACHE_BYTES = 32 << 20  # marshalled blocks kept, all programs together

Key = tuple[str, int, bytes, int]  # compiler tag, code start, sha256 of the code, RAM size


def cache_key(tag: str, code_start: int, code: bytes, ram_size: int) -> Key:
    return (tag, code_start, hashlib.sha256(code).digest(), ram_size)


class CodeCache:
    """(pc, marshalled code) lists by Key; ``put`` merges, ``get`` returns a copy."""

    def __init__(self, max_bytes: int = MAX_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Key, dict[int, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, key: Key, blocks: Sequence[tuple[int, bytes]]) -> None:
        with self._lock:
            entry = self._entries.setdefault(key, {})
            self._entries.move_to_end(key)
            for pc, blob in blocks:
                self._bytes += len(blob) - len(entry.get(pc, b""))
                entry[pc] = blob
            while self._bytes > self.max_bytes and self._entries:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= sum(map(len, dropped.values()))

    def get(self, key: Key) -> list[tuple[int, bytes]]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return []
            self._entries.move_to_end(key)
            return list(entry.items())

    @property
    def size_bytes(self) -> int:
        return self._bytes
