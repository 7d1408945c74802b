"""One RPC client per store identity, shared by every session of an access server.

Owns: where each store identity (``mss1``...) answers -- the address and
``rpc`` port of its active ``[[instance]]``, which a spare assumes when it
takes the identity over -- and the client each identity is reached by::

    stores = StoreClients.from_config(config, instance="imap1")
    rpc = stores.client(account.mss)
    status = await rpc.call("mailbox.status", {"user": u, "name": "INBOX"}, idempotent=True)

Invariants:

- One :class:`~intermail.rpc.client.RpcClient` per identity for the whole
  process: sessions share its connection (calls are multiplexed), its push
  subscriptions and its reconnects.
- A lost connection (the store failed over) is retried for
  ``access.failover_window`` seconds: idempotent calls are sent again to the
  new owner, so a session sees a pause; each subscriber's ``on_reconnect``
  hook then resynchronises what pushes it may have missed.
- An identity the configuration does not name is ``UNAVAILABLE`` (the
  directory placed the user on a store this cluster does not know).

Logs: nothing (the RPC client logs connections).
"""

from __future__ import annotations

from collections.abc import Mapping

from intermail.config import Config
from intermail.errors import ErrorKind, MailError
from intermail.rpc.client import RpcClient

__all__ = ["StoreClients", "store_rpc_addresses"]


def store_rpc_addresses(config: Config) -> dict[str, tuple[str, int]]:
    """Each store identity's RPC address: the address and ``rpc`` port of its active instance."""
    out: dict[str, tuple[str, int]] = {}
    for inst in config.instances_of("mss"):
        if inst.role in ("active", "") and inst.ports.get("rpc"):
            out[inst.identity or inst.name] = (inst.address, inst.ports["rpc"])
    return out


class StoreClients:
    """The RPC clients of the stores, created on first use."""

    def __init__(self, addresses: Mapping[str, tuple[str, int]], *, instance: str = "",
                 failover_window: float = 30.0, request_timeout: float = 30.0, connect_timeout: float = 2.0):
        self.addresses = dict(addresses)
        self.instance = instance
        self.failover_window = failover_window
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self._clients: dict[str, RpcClient] = {}

    @classmethod
    def from_config(cls, config: Config, *, instance: str = "") -> StoreClients:
        a = config.access
        return cls(store_rpc_addresses(config), instance=instance, failover_window=a.failover_window,
                   request_timeout=a.store_timeout)

    def client(self, identity: str) -> RpcClient:
        found = self._clients.get(identity)
        if found is not None:
            return found
        address = self.addresses.get(identity)
        if address is None:
            raise MailError(ErrorKind.UNAVAILABLE, safe="mail store unavailable",
                            detail=f"no store identity {identity!r} in the configuration")
        # keepalive well inside the window, so an idle IDLE session notices a dead store in time
        client = RpcClient([address], instance=self.instance, connect_timeout=self.connect_timeout,
                           request_timeout=self.request_timeout, reconnect_window=self.failover_window,
                           keepalive=min(30.0, max(1.0, self.failover_window / 3)),
                           max_backoff=0.1)  # a take-over is over in well under a second: notice it soon
        self._clients[identity] = client
        return client

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
