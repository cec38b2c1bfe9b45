"""A small CRI client (runtime.v1) over containerd's gRPC socket, as the kubelet uses it.

    cri = CriClient("/tmp/…/containerd.sock")
    pod = host_network_pod("web", log_directory="/tmp/…/pods/web", cgroup_parent="/pyshim-cri-1a2b")
    sandbox_id = cri.run_pod_sandbox(pod, "pyshim")
    cid = cri.create_container(sandbox_id, container("c1", IMAGE, ["sh", "-c", "echo hi"]), pod)
    cri.start_container(cid)
    status = cri.wait_container_exited(cid)          # ContainerStatus; exit_code, reason
    cri.stop_pod_sandbox(sandbox_id); cri.remove_pod_sandbox(sandbox_id)

Every call has a deadline (the kubelet's runtime request timeout is 2 minutes); ExecSync's
deadline is its own timeout plus a margin, as in the kubelet. The ids the client created are
kept in `sandbox_ids` and `container_ids`, so that a test harness can check what they left.
"""
from __future__ import annotations

import time

import grpc

from cri import api_pb2 as api
from cri import api_pb2_grpc as api_grpc

CALL_TIMEOUT = 60.0  # seconds, per RPC
EXEC_SYNC_MARGIN = 30.0  # added to ExecSync's own timeout for the RPC deadline

# Namespace modes of a host-network pod without shareProcessNamespace, as the kubelet sends them.
HOST_NETWORK = api.NamespaceOption(network=api.NODE, pid=api.CONTAINER, ipc=api.POD)


def host_network_pod(name, *, log_directory, cgroup_parent, uid=None, namespace="default", labels=None):
    """A PodSandboxConfig for a host-network pod (no CNI needed). No hostname: a host-network pod
    has no UTS namespace of its own to set it in."""
    return api.PodSandboxConfig(
        metadata=api.PodSandboxMetadata(name=name, uid=uid or f"uid-{name}", namespace=namespace, attempt=0),
        log_directory=str(log_directory),
        labels=labels or {},
        linux=api.LinuxPodSandboxConfig(
            cgroup_parent=cgroup_parent,
            security_context=api.LinuxSandboxSecurityContext(namespace_options=HOST_NETWORK)))


def container(name, image, command, *, args=(), memory_limit=0, log_path=None, labels=None):
    """A ContainerConfig; its log goes to `<pod log_directory>/<log_path or name.log>`."""
    return api.ContainerConfig(
        metadata=api.ContainerMetadata(name=name, attempt=0),
        image=api.ImageSpec(image=image),
        command=list(command),
        args=list(args),
        log_path=log_path or f"{name}.log",
        labels=labels or {},
        linux=api.LinuxContainerConfig(
            resources=api.LinuxContainerResources(memory_limit_in_bytes=memory_limit),
            security_context=api.LinuxContainerSecurityContext(namespace_options=HOST_NETWORK)))


class CriClient:
    """runtime.v1 RuntimeService and ImageService on `unix://<address>`."""

    def __init__(self, address, timeout=CALL_TIMEOUT):
        self.channel = grpc.insecure_channel(f"unix://{address}")
        self.runtime = api_grpc.RuntimeServiceStub(self.channel)
        self.images = api_grpc.ImageServiceStub(self.channel)
        self.timeout = timeout
        self.sandbox_ids = []
        self.container_ids = []

    def close(self):
        self.channel.close()

    # -- runtime ------------------------------------------------------------------------------

    def version(self):
        return self.runtime.Version(api.VersionRequest(version="v1"), timeout=self.timeout)

    def run_pod_sandbox(self, config, runtime_handler):
        reply = self.runtime.RunPodSandbox(api.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler),
                                           timeout=self.timeout)
        self.sandbox_ids.append(reply.pod_sandbox_id)
        return reply.pod_sandbox_id

    def pod_sandbox_status(self, sandbox_id, verbose=False):
        """PodSandboxStatusResponse (status, and with `verbose` the `info` map)."""
        return self.runtime.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=verbose),
                                             timeout=self.timeout)

    def list_pod_sandboxes(self):
        return list(self.runtime.ListPodSandbox(api.ListPodSandboxRequest(), timeout=self.timeout).items)

    def stop_pod_sandbox(self, sandbox_id):
        self.runtime.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=self.timeout)

    def remove_pod_sandbox(self, sandbox_id):
        self.runtime.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=self.timeout)

    def create_container(self, sandbox_id, config, sandbox_config):
        reply = self.runtime.CreateContainer(
            api.CreateContainerRequest(pod_sandbox_id=sandbox_id, config=config, sandbox_config=sandbox_config),
            timeout=self.timeout)
        self.container_ids.append(reply.container_id)
        return reply.container_id

    def start_container(self, container_id):
        self.runtime.StartContainer(api.StartContainerRequest(container_id=container_id), timeout=self.timeout)

    def stop_container(self, container_id, timeout):
        """StopContainer: the stop signal, then SIGKILL after `timeout` seconds."""
        self.runtime.StopContainer(api.StopContainerRequest(container_id=container_id, timeout=timeout),
                                   timeout=self.timeout + timeout)

    def remove_container(self, container_id):
        self.runtime.RemoveContainer(api.RemoveContainerRequest(container_id=container_id), timeout=self.timeout)

    def container_status(self, container_id):
        """The ContainerStatus message."""
        return self.runtime.ContainerStatus(api.ContainerStatusRequest(container_id=container_id),
                                            timeout=self.timeout).status

    def list_containers(self, sandbox_id=""):
        request = api.ListContainersRequest(filter=api.ContainerFilter(pod_sandbox_id=sandbox_id))
        return list(self.runtime.ListContainers(request, timeout=self.timeout).containers)

    def exec_sync(self, container_id, cmd, timeout=0):
        """ExecSyncResponse (stdout, stderr, exit_code); `timeout` in whole seconds, 0 = none."""
        return self.runtime.ExecSync(api.ExecSyncRequest(container_id=container_id, cmd=list(cmd), timeout=timeout),
                                     timeout=(timeout or self.timeout) + EXEC_SYNC_MARGIN)

    def container_stats(self, container_id):
        """The ContainerStats message (CRI asks the shim: Stats)."""
        return self.runtime.ContainerStats(api.ContainerStatsRequest(container_id=container_id),
                                           timeout=self.timeout).stats

    def wait_container_state(self, container_id, state, timeout=30.0):
        """Poll ContainerStatus until the container is in `state`; return the ContainerStatus."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.container_status(container_id)
            if status.state == state:
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"container {container_id} is {api.ContainerState.Name(status.state)}, not "
                                     f"{api.ContainerState.Name(state)}, after {timeout}s")
            time.sleep(0.05)

    def wait_container_exited(self, container_id, timeout=30.0):
        return self.wait_container_state(container_id, api.CONTAINER_EXITED, timeout)

    # -- images -------------------------------------------------------------------------------

    def image_status(self, image):
        """The Image, or None if CRI does not have it."""
        reply = self.images.ImageStatus(api.ImageStatusRequest(image=api.ImageSpec(image=image)), timeout=self.timeout)
        return reply.image if reply.HasField("image") else None

    def list_images(self):
        return list(self.images.ListImages(api.ListImagesRequest(), timeout=self.timeout).images)
