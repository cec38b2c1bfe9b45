"""Pin the wire format of our generated messages to shared/reference (task-api.md, events.md,
runc-and-io.md, shim-cli.md): containerd decodes what we send, so field numbers and types
must match exactly."""

import importlib
import pkgutil

import pytest
from google.protobuf import descriptor as _d
from google.protobuf import timestamp_pb2

import shim.api
from shim.api import (
    bootstrap_pb2,
    cgroups_v1_pb2,
    cgroups_v2_pb2,
    envelope_pb2,
    events_pb2,
    runc_options_pb2,
    runctypes_pb2,
    runtimeoptions_pb2,
    task_pb2,
    task_types_pb2,
)

F = _d.FieldDescriptor


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def fields(cls) -> dict[str, tuple[int, int]]:
    """name -> (number, FieldDescriptor.TYPE_*)"""
    return {f.name: (f.number, f.type) for f in cls.DESCRIPTOR.fields}


def test_all_modules_import_without_clashes():
    # Importing every module registers all files in the default pool; a duplicate
    # fully-qualified name or a gencode/runtime version mismatch raises here.
    names = [m.name for m in pkgutil.iter_modules(shim.api.__path__) if m.name.endswith("_pb2")]
    assert len(names) >= 11
    for name in names:
        importlib.import_module(f"shim.api.{name}")


def test_delete_response_observed_bytes():
    # shim-cli.md section 7: bytes printed by runc-v2's `delete` action (1.6.20).
    raw = bytes.fromhex("08eb73" "108901" "1a0c" "08a8fca7d806" "10f7fad98c01")
    resp = task_pb2.DeleteResponse.FromString(raw)
    assert resp.pid == 14827
    assert resp.exit_status == 137
    assert resp.HasField("exited_at") and resp.exited_at.seconds > 1_600_000_000
    assert resp.SerializeToString() == raw


def test_go_zero_time_encoding():
    # task-api.md section 4: unexited exited_at = Go zero time, 10-byte varint seconds.
    ts = timestamp_pb2.Timestamp(seconds=-62135596800)
    assert ts.SerializeToString() == b"\x08" + varint(18446744011573954816)
    assert len(varint(18446744011573954816)) == 10


def test_state_response_fields():
    f = fields(task_pb2.StateResponse)
    assert f["status"] == (4, F.TYPE_ENUM)
    assert f["exit_status"] == (9, F.TYPE_UINT32)
    assert f["exited_at"] == (10, F.TYPE_MESSAGE)
    assert f["exec_id"] == (11, F.TYPE_STRING)
    msg = task_pb2.StateResponse(exec_id="e", status=task_types_pb2.RUNNING)
    assert msg.SerializeToString() == b"\x20\x02" + b"\x5a\x01e"
    assert task_types_pb2.Status.Value("PAUSING") == 5


def test_task_service_methods():
    svc = task_pb2.DESCRIPTOR.services_by_name["Task"]
    assert svc.full_name == "containerd.task.v2.Task"
    methods = {m.name: (m.input_type.name, m.output_type.full_name) for m in svc.methods}
    assert len(methods) == 17
    assert methods["Create"] == ("CreateTaskRequest", "containerd.task.v2.CreateTaskResponse")
    assert methods["Exec"] == ("ExecProcessRequest", "google.protobuf.Empty")
    assert methods["Checkpoint"] == ("CheckpointTaskRequest", "google.protobuf.Empty")
    assert methods["Update"] == ("UpdateTaskRequest", "google.protobuf.Empty")
    assert methods["Shutdown"] == ("ShutdownRequest", "google.protobuf.Empty")


def test_create_and_update_requests():
    f = fields(task_pb2.CreateTaskRequest)
    assert f["rootfs"] == (3, F.TYPE_MESSAGE)
    assert f["parent_checkpoint"] == (9, F.TYPE_STRING)
    assert f["options"] == (10, F.TYPE_MESSAGE)
    upd = task_pb2.UpdateTaskRequest.DESCRIPTOR.fields_by_name["annotations"]
    assert upd.number == 3 and upd.message_type.GetOptions().map_entry


def test_envelope_fields():
    f = fields(envelope_pb2.Envelope)
    assert f == {
        "timestamp": (1, F.TYPE_MESSAGE),
        "namespace": (2, F.TYPE_STRING),
        "topic": (3, F.TYPE_STRING),
        "event": (4, F.TYPE_MESSAGE),
    }
    assert envelope_pb2.Envelope.DESCRIPTOR.full_name == (
        "containerd.services.events.ttrpc.v1.Envelope"
    )
    svc = envelope_pb2.DESCRIPTOR.services_by_name["Events"]
    assert svc.full_name == "containerd.services.events.ttrpc.v1.Events"
    assert svc.methods_by_name["Forward"].output_type.full_name == "google.protobuf.Empty"
    req = envelope_pb2.ForwardRequest(envelope=envelope_pb2.Envelope(topic="/t"))
    assert req.SerializeToString() == b"\x0a\x04" + b"\x1a\x02/t"


def test_task_exit_fields():
    f = fields(events_pb2.TaskExit)
    assert f["container_id"] == (1, F.TYPE_STRING)
    assert f["id"] == (2, F.TYPE_STRING)
    assert f["pid"] == (3, F.TYPE_UINT32)
    assert f["exit_status"] == (4, F.TYPE_UINT32)
    assert f["exited_at"] == (5, F.TYPE_MESSAGE)
    assert fields(events_pb2.TaskDelete)["id"] == (5, F.TYPE_STRING)
    assert fields(events_pb2.TaskCreate)["io"] == (4, F.TYPE_MESSAGE)


def test_runc_options_fields():
    f = fields(runc_options_pb2.Options)
    assert len(f) == 13
    assert f["binary_name"] == (6, F.TYPE_STRING)
    assert f["root"] == (7, F.TYPE_STRING)
    assert f["systemd_cgroup"] == (9, F.TYPE_BOOL)
    assert f["task_api_version"] == (13, F.TYPE_UINT32)
    opts = runc_options_pb2.Options(binary_name="runc", root="/r")
    assert opts.SerializeToString() == b"\x32\x04runc" + b"\x3a\x02/r"
    assert fields(runc_options_pb2.ProcessDetails) == {"exec_id": (1, F.TYPE_STRING)}


def test_legacy_and_runtimeoptions():
    f = fields(runctypes_pb2.CreateOptions)
    assert len(f) == 13
    assert f["no_new_keyring"] == (8, F.TYPE_BOOL)
    assert f["io_uid"] == (10, F.TYPE_UINT32)
    assert f["criu_image_path"] == (13, F.TYPE_STRING)
    assert runctypes_pb2.CreateOptions.DESCRIPTOR.full_name == "containerd.linux.runc.CreateOptions"
    assert fields(runtimeoptions_pb2.Options) == {
        "type_url": (1, F.TYPE_STRING),
        "config_path": (2, F.TYPE_STRING),
        "config_body": (3, F.TYPE_BYTES),
    }


def test_cgroup_metrics():
    assert fields(cgroups_v1_pb2.Metrics)["memory_oom_control"] == (9, F.TYPE_MESSAGE)
    assert fields(cgroups_v1_pb2.MemoryStat)["kernel_tcp"] == (36, F.TYPE_MESSAGE)
    assert fields(cgroups_v1_pb2.CPUUsage)["per_cpu"] == (4, F.TYPE_UINT64)
    v2 = fields(cgroups_v2_pb2.Metrics)
    assert 3 not in {n for n, _ in v2.values()}
    assert v2["memory"] == (4, F.TYPE_MESSAGE)
    assert fields(cgroups_v2_pb2.MemoryStat)["max_usage"] == (36, F.TYPE_UINT64)
    assert fields(cgroups_v2_pb2.MemoryStat)["psi"] == (38, F.TYPE_MESSAGE)
    assert fields(cgroups_v2_pb2.PSIData)["avg10"] == (1, F.TYPE_DOUBLE)


def test_bootstrap_params_and_result():
    raw = (
        b"\x0a\x02c1"  # instance_id
        + b"\x12\x07default"  # namespace
        + b"\x18" + varint(-4)  # log_level DEBUG, negative enum = 10-byte varint
        + b"\x4a\x04/run"  # socket_dir (9)
    )
    params = bootstrap_pb2.BootstrapParams.FromString(raw)
    assert params.instance_id == "c1" and params.namespace == "default"
    assert params.log_level == bootstrap_pb2.LOG_LEVEL_DEBUG == -4
    assert params.HasField("socket_dir") and params.socket_dir == "/run"
    assert fields(bootstrap_pb2.BootstrapParams)["extensions"] == (8, F.TYPE_MESSAGE)
    f = fields(bootstrap_pb2.BootstrapResult)
    assert f["version"] == (1, F.TYPE_INT32)
    assert f["capabilities"] == (4, F.TYPE_ENUM)
    assert f["metadata"] == (5, F.TYPE_MESSAGE)
    res = bootstrap_pb2.BootstrapResult(version=2, address="unix:///s", protocol="ttrpc")
    assert res.SerializeToString() == b"\x08\x02\x12\x09unix:///s\x1a\x05ttrpc"


@pytest.mark.parametrize(
    "cls,full_name",
    [
        (task_pb2.DeleteResponse, "containerd.task.v2.DeleteResponse"),
        (events_pb2.TaskOOM, "containerd.events.TaskOOM"),
        (task_types_pb2.ProcessInfo, "containerd.v1.types.ProcessInfo"),
        (cgroups_v2_pb2.Metrics, "io.containerd.cgroups.v2.Metrics"),
        (runc_options_pb2.Options, "containerd.runc.v1.Options"),
    ],
)
def test_type_url_names(cls, full_name):
    # containerd's Any type URLs are the bare full names.
    assert cls.DESCRIPTOR.full_name == full_name
