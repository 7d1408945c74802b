"""The MTA's mail queue: messages accepted and not yet delivered, on the durable log engine.

Postfix's model: explicit states (``incoming``, ``active``, ``deferred``,
``hold``, ``corrupt``) and exactly one mover (:mod:`.manager`) that changes
them.  :mod:`.store` owns the records and what survives a crash;
:mod:`.manager` schedules attempts, hands recipients to the transports and
records outcomes, bounces and retries.
"""
