"""ttrpc, containerd's lightweight RPC protocol, for the shim: unary calls over Unix sockets.

Layout: `codec` is the sans-IO core (frames and Request/Response messages to and
from bytes); `errors` has the status codes and TTRPCError; `server` and `client`
are thin threaded transports over it; `ttrpc_pb2` is generated from
protos/shim/ttrpc/ttrpc.proto. Nothing here depends on the rest of `shim`.
"""

from .client import Client, ConnectionClosedError
from .errors import Code, TTRPCError
from .server import Context, Handler, Server

__all__ = ["Client", "Code", "ConnectionClosedError", "Context", "Handler", "Server", "TTRPCError"]
