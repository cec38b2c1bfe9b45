"""Talking to a task's shim directly, the way containerd does: ttrpc on the socket named in the
bundle's `bootstrap.json` (containerd 2.x) or `address` file, service containerd.task.v2.Task (v3
for a shim that announced version 3, as runc-v2 2.x does), messages from shim.api.task_pb2.

For what `ctr` cannot show: the status code of an error (containerd rewrites messages but keeps
codes), RPCs `ctr` 1.6 has no command for (Update, ResizePty on a chosen process), and the shim's
own pid (ConnectResponse). Works with any v2 shim, containerd-shim-runc-v2 included.

    with ShimClient(containerd, cid) as shim:
        shim.call("Pause", task_pb2.PauseRequest(id=cid))
        error = shim.error("Start", task_pb2.StartRequest(id=cid))   # the TTRPCError it raised
"""
import json

from google.protobuf.empty_pb2 import Empty

from e2e import shims
from shim.api import task_pb2
from shim.ttrpc import Client, Code, TTRPCError

RESPONSES = {
    "State": task_pb2.StateResponse, "Create": task_pb2.CreateTaskResponse, "Start": task_pb2.StartResponse,
    "Delete": task_pb2.DeleteResponse, "Pids": task_pb2.PidsResponse, "Wait": task_pb2.WaitResponse,
    "Stats": task_pb2.StatsResponse, "Connect": task_pb2.ConnectResponse,
}  # every other method answers google.protobuf.Empty
PYSHIM = "io.containerd.pyshim.v1"


def state_error_code(containerd):
    """The code a request that is illegal in the process's state fails with. pyshim models the
    lifecycle as a state machine and answers FailedPrecondition; containerd-shim-runc-v2 returns
    plain Go errors for these, which ttrpc sends as Unknown (by its design, not a test mistake)."""
    return Code.FAILED_PRECONDITION if containerd.runtime == PYSHIM else Code.UNKNOWN


class ShimClient:
    def __init__(self, containerd, cid, namespace=None):
        self.namespace = namespace or containerd.namespace
        bundle = shims.bundle(containerd, cid, namespace)
        if (bundle / "bootstrap.json").exists():
            bootstrap = json.loads((bundle / "bootstrap.json").read_text())
            address, version = bootstrap["address"], bootstrap.get("version", 2)
        else:
            address, version = (bundle / "address").read_text().strip(), 2
        self.service = f"containerd.task.v{version}.Task"  # same messages in v2 and v3
        self.client = Client(address, connect_timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.client.close()

    def call(self, method, request, timeout=30.0):
        return self.client.call(self.service, method, request, RESPONSES.get(method, Empty), timeout=timeout,
                                metadata={"containerd-namespace-ttrpc": self.namespace})

    def error(self, method, request, timeout=30.0):
        """The TTRPCError the call fails with; AssertionError if it succeeds."""
        try:
            response = self.call(method, request, timeout)
        except TTRPCError as e:
            return e
        raise AssertionError(f"{method}({request}) succeeded: {response}")

    def shim_pid(self, cid):
        return self.call("Connect", task_pb2.ConnectRequest(id=cid)).shim_pid
