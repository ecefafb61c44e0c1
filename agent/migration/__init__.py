"""ferry's migration engine: live migration of VMs in and out of this agent.

``MigrationManager`` (manager.py) is what the daemon and the control API use
(docs/CONTRACTS.md). Inside: ``source`` and ``destination`` run one session
each in a thread, ``transport`` is the data path (the only socket code),
``pages`` plans batches, finds zero pages and digests guest RAM, ``policy``
is the pure convergence decision, ``info`` the MigrationInfo report.
"""

from agent.migration.info import MigrationInfo, MigrationParams, Status
from agent.migration.manager import MigrationManager

__all__ = ["MigrationInfo", "MigrationManager", "MigrationParams", "Status"]
