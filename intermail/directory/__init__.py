"""The directory: addresses, password hashes and the primary's durable store.

Owns the data layer of ``dird`` (issue 3): address grammar and normalisation
(:mod:`.address`), argon2id password hashing (:mod:`.passwords`) and the
SQLite store with its change log (:mod:`.db`).  No network, no RPC here.

Logs: nothing (see each module).
"""
