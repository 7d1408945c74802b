"""The access servers' sessions: IMAP and POP3 for mail clients, over the store RPC.

An access server holds sessions only: it authenticates against the
directory, then every command becomes calls on the user's store
(:mod:`intermail.mailstore.service`) through one shared RPC client per
store identity (:mod:`.stores`).  The protocol machines are in
:mod:`intermail.proto`; the sessions here drive them with the pump.
"""
