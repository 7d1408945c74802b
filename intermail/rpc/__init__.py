"""asyncio client and server over the store/directory RPC machine (:mod:`intermail.proto.rpc`).

:mod:`intermail.rpc.server` serves a table of handlers on the runner
skeleton; :mod:`intermail.rpc.client` calls them with failover across
addresses, reconnect and retry of idempotent calls, streamed bodies and
pushes.  Method names and their arguments belong to the users (the message
store, the directory).

Imports: ``proto``, ``net``, ``errors``, ``ids``, ``log`` -- never
``storage``, ``config`` or ``admin`` (checked by import-linter).

Logs: the ``rpc.*`` events, registered in :mod:`intermail.rpc._common`.
"""

from intermail.rpc.client import ResponseBody, RpcClient, Subscription
from intermail.rpc.server import BUILTIN_METHODS, CallContext, RpcServer, ServerConnection, Streamed

__all__ = [
    "RpcClient",
    "ResponseBody",
    "Subscription",
    "RpcServer",
    "ServerConnection",
    "CallContext",
    "Streamed",
    "BUILTIN_METHODS",
]
