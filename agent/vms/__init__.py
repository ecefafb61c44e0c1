"""The VM manager: the VMs of this host, one VM process each, and guest memory reserved for incoming VMs.

This package owns the lifecycle of every VM on the host: creating guest RAM (a memfd shared with the
VM process), spawning `python -m vmruntime.vmproc`, talking to it over its SEQPACKET control socket,
buffering its console, following its state, tearing it down without leaking processes or memory,
and re-adopting the VMs a previous run of the agent left running (VM processes outlive their agent;
docs/RELIABILITY.md "Agent restarts"). Its modules, one concern each:

  errors.py     VMError, NoSuchVM, the rule for VM names
  ram.py        guest RAM: create, and release off the event loop
  process.py    what the manager needs of a VM process; wait-then-kill (`reap`)
  channel.py    VMChannel (the control socket, asyncio) and ConsoleBuffer
  vm.py         VM: one VM, its state and the surface the migration engine drives
  recording.py  attach sockets and records in the state dir (written off the loop, in order)
  spare.py      the spare VM process started ahead of need
  incoming.py   incoming VMs: reserve, prepare, claim, restore, discard
  adopt.py      re-adoption after an agent restart, and its ownership rules
  manager.py    VMManager: lookup, capacity, create, destroy, shutdown, and delegates to the above

The migration engine uses the surface fixed in docs/CONTRACTS.md and nothing else; threads reach it
only through the loop bridge (docs/ARCHITECTURE.md). Everything importable from `agent.vms` before it
became a package is importable from here still.
"""

from agent.vms.adopt import AdoptedProcess, AdoptError, Settle, settle_action
from agent.vms.channel import CONSOLE_BUFFER, REQUEST_TIMEOUT, ConsoleBuffer, VMChannel
from agent.vms.errors import NoSuchVM, VMError, check_name
from agent.vms.incoming import MIGRATED_PROGRAM, Incoming
from agent.vms.manager import VMManager
from agent.vms.process import STOP_GRACE, VMProcess
from agent.vms.ram import PAGE_SIZE, close_guest_ram, create_guest_ram, release_guest_ram
from agent.vms.spare import SPARE_DELAY_S, Spare
from agent.vms.vm import RUN_STATES, VM

__all__ = [
    "CONSOLE_BUFFER", "MIGRATED_PROGRAM", "PAGE_SIZE", "REQUEST_TIMEOUT", "RUN_STATES", "SPARE_DELAY_S",
    "STOP_GRACE", "VM", "AdoptError", "AdoptedProcess", "ConsoleBuffer", "Incoming", "NoSuchVM", "Settle",
    "Spare", "VMChannel", "VMError", "VMManager", "VMProcess", "check_name", "close_guest_ram",
    "create_guest_ram", "release_guest_ram", "settle_action",
]
