"""ferry's migration engine: live migration of VMs in and out of this agent.

``MigrationManager`` (manager.py) is what the daemon and the control API use
(docs/CONTRACTS.md). Inside: ``source`` and ``destination`` run one session
each in a thread, ``transport`` is the data path (the only socket code, over
proto's Channel), ``pages`` plans batches, finds zero pages and digests guest
RAM, ``policy`` is the pure convergence decision, ``info`` the MigrationInfo
report. Beside the source's sequence: ``source_digest`` (its RAM digest and
the thread that finishes it), ``rounds`` (the round figures and the policy's
inputs), ``in_doubt`` (the queries after an unanswered COMMIT); beside the
destination's: ``outcomes`` (the in-doubt answers' truth). ``seams`` states
what the engine needs of the VM manager; ``common`` holds the loop bridge and
the handshake.
"""

from agent.migration.info import MigrationInfo, MigrationParams, Status
from agent.migration.manager import MigrationManager

__all__ = ["MigrationInfo", "MigrationManager", "MigrationParams", "Status"]
