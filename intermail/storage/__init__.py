"""The durable log engine shared by the MTA queue and the message store.

See :mod:`intermail.storage.engine` for the invariants (I-1, I-2, I-3, I-5,
I-6) and ``docs/storage.md`` for the on-disk format and the tests that hold
the engine to them.
"""

from intermail.storage.engine import RecoveryReport, Store, StoreOptions, Transaction, rebuild_index
from intermail.storage.index import Applier
from intermail.storage.records import FIRST_CONSUMER_TYPE

__all__ = ["Applier", "FIRST_CONSUMER_TYPE", "RecoveryReport", "Store", "StoreOptions", "Transaction",
           "rebuild_index"]
