"""Decoding what a client sends: the ttrpc Request and every Task method's request type, from
arbitrary bytes and from arbitrary messages, the way the server decodes them (server._invoke):
a message or TTRPCError(Internal), never another exception."""
from hypothesis import example, given
from hypothesis import strategies as st

from shim.api import task_pb2
from shim.task.service import TaskService
from shim.ttrpc import Code, Context, TTRPCError
from shim.ttrpc.server import _invoke
from shim.ttrpc.ttrpc_pb2 import Request

from strategies import messages



def method_table():
    """name -> request type, from TaskService.methods() on an instance that is never started."""
    service = TaskService.__new__(TaskService)  # methods() only reads bound methods
    return {name: req_type for name, (req_type, _) in TaskService.methods(service).items()}


TABLE = method_table()
CTX = Context("containerd.task.v2.Task", "x", {}, None)


def test_every_task_method_is_fuzzed():
    assert len(TABLE) == 17 and all(t.__module__ == task_pb2.__name__ for t in TABLE.values())


@given(method=st.sampled_from(sorted(TABLE)), data=st.binary(max_size=400))
@example(method="Create", data=b"\x0a\xff\xff\xff\xff\x0f")  # a length past the end
@example(method="Kill", data=b"\x08\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80")  # an 11-byte varint
@example(method="Exec", data=b"\x0b")  # an unterminated group
def test_arbitrary_bytes_decode_to_the_request_or_internal(method, data):
    req_type = TABLE[method]
    seen = []
    try:
        _invoke(data, req_type, lambda req, ctx: seen.append(req) or req, CTX)
    except TTRPCError as exc:
        assert exc.code == Code.INTERNAL and "error unmarshalling payload" in exc.message
        assert not seen  # the handler never saw it
    else:
        assert isinstance(seen[0], req_type)


@given(method=st.sampled_from(sorted(TABLE)), data=st.data())
def test_arbitrary_requests_round_trip(method, data):
    req_type = TABLE[method]
    msg = data.draw(messages(req_type))
    wire = msg.SerializeToString()
    back = req_type.FromString(wire)
    assert back == msg or msg != msg  # NaN floats never compare equal to themselves


@given(messages(Request))
def test_ttrpc_requests_round_trip(req):
    assert Request.FromString(req.SerializeToString()) == req
