"""The mail store: mailboxes, UIDs, flags, idempotent delivery, change notifications on the durable log engine."""
