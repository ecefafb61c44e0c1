"""Translating a migrating guest's code blocks on the destination before it resumes.

A VM process compiles each guest block on its first run (vmruntime/interp.py). After a migration
the destination's process starts with none, so a guest's first answers there wait for tens of
blocks to compile: the VM runs again but a network client still sees no answer (docs/PERFORMANCE.md,
"The guest network"). The source therefore tells the destination which
blocks its vCPU had compiled (the protocol's CodeHint, as pre-copy starts); the destination's
VM process, idle until the restore, translates them between requests, and the restore hands the
machine what is ready.

Translation needs only the code and the RAM size, so it runs before the CPU state, or even the
guest's pages, are there: the hint carries the code's bytes. Nothing here trusts it: PCs outside
the code are skipped, and `take` hands the blocks over only when the restored machine's code
region is the same range and its RAM holds the same bytes as those they were translated from.
"""

from __future__ import annotations

import mmap
from collections import deque
from types import CodeType

from vmruntime import isa
from vmruntime.interp import BlockCompiler, load_block, translated_pairs

MAX_HINT_BLOCKS = 4096  # PCs one hint may name: far more than any guest program here compiles
MAX_TRANSLATED_BYTES = 512 << 10  # marshalled blocks in one reply or request (a control message is 1 MiB)


class Warmup:
    """Blocks of one code region translated ahead, one per ``step``, for a later restore."""

    def __init__(self, code_start: object, code: object, ram_size: int, pcs: object,
                 translated: object = None) -> None:
        """translated: [pc, marshalled code] pairs of this code's blocks, translated by another VM
        process of this host with the same COMPILER_TAG (the agent keeps them: agent/code_cache.py)."""
        if not isinstance(code_start, int) or isinstance(code_start, bool) or not isinstance(code, bytes):
            raise ValueError("warm needs code-start (an address) and code (bytes)")
        if not 0 <= code_start <= code_start + len(code) <= min(ram_size, isa.CODE_LIMIT):
            raise ValueError(f"{len(code)} code bytes at {code_start:#x} are outside the code region "
                             f"of a {ram_size}-byte guest")
        if not isinstance(pcs, list | tuple) or len(pcs) > MAX_HINT_BLOCKS:
            raise ValueError(f"pcs must be a list of at most {MAX_HINT_BLOCKS} addresses")
        end = code_start + len(code)
        self.code_range = (code_start, end)
        self._code = code
        self._ram_size = ram_size
        self._compiler = BlockCompiler(code, code_start, ram_size, {})
        wanted = (pc for pc in pcs if isinstance(pc, int) and not isinstance(pc, bool) and code_start <= pc < end)
        self._pending = deque(dict.fromkeys(wanted))  # in the hint's order, each once
        self._translated = translated_pairs(translated)
        if self._translated:  # loading a block costs a small part of translating it: those go first
            self._pending = deque(sorted(self._pending, key=lambda pc: pc not in self._translated))
        self.ready: dict[int, CodeType] = {}
        self._warm = self._cold = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def step(self) -> None:
        """Translate (or load) the next pending block: one block is all a restore arriving meanwhile
        waits for."""
        if not self._pending:
            return
        pc = self._pending.popleft()
        code = load_block(self._translated.pop(pc, None))
        try:
            self.ready[pc] = code if code is not None else self._compiler.translate(pc)
        except Exception:  # noqa: BLE001 - a block that fails here is compiled (or faults) when run
            pass

    def take(self, ram: mmap.mmap, state: object) -> dict[int, CodeType]:
        """The translated blocks if the code region a saved ``state`` names is the one they were
        translated from and ``ram`` holds the same bytes there, else none; either way this
        warm-up is spent (what was still pending is counted cold)."""
        code = state.get("code") if isinstance(state, dict) else None
        same = (isinstance(code, list | tuple) and tuple(code) == self.code_range and len(ram) == self._ram_size
                and ram[self.code_range[0]:self.code_range[1]] == self._code)
        self._cold = len(self._pending) + (0 if same else len(self.ready))
        self._pending.clear()
        ready, self.ready = (self.ready if same else {}), {}
        self._warm = len(ready)
        return ready

    def counts(self) -> dict[str, int]:
        """After ``take``: blocks handed over translated, and those named but not (compiled on first run)."""
        return {"code-blocks-warm": self._warm, "code-blocks-cold": self._cold}
