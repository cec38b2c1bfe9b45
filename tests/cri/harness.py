"""A private containerd with its CRI plugin on, for the CRI tests (tests/cri/conftest.py).

`CriContainerd` is the end-to-end harness's `TestContainerd` (tests/e2e/harness.py) with:

- the CRI plugin configured from the snippet we ship, used as it is:
  runtime_config/containerd-1.x.toml (config version 2) or containerd-2.x.toml (version 3),
  whichever matches the version of the harness's config; plus a `runc` handler (runc-v2) if
  the snippet has none, for comparisons;
- `restrict_oom_score_adj = true` (the test machines lack CAP_SYS_RESOURCE, and the pause
  container asks for oom_score_adj -998);
- CNI pointed at empty directories under the work directory: the tests run host-network pods,
  which need no CNI;
- a pause image built locally (the busybox image with the entrypoint `sleep 100000`) as the
  sandbox image, and the busybox image, both imported into containerd's `k8s.io` namespace,
  where CRI keeps everything;
- a `CriClient` (`.cri`) on containerd's socket that remembers the ids it created.

Everything CRI keeps on disk (its root and state directories, pod sandbox files, /dev/shm mounts,
container logs) lives under the work directory. What cannot: runc state in
/run/containerd/runc/k8s.io/<id>, shim sockets in /run/containerd/s, and cgroups, which the pods
put below a cgroup parent of the session's own, /pyshim-cri-<random>. The leak check covers all
of these, exactly: only the ids this session's client created are looked at.
"""
import hashlib
import os
import re
import shutil
import subprocess
import tomllib
import uuid
from pathlib import Path

from cri.client import CriClient
from e2e.harness import RUNC_V2_ROOT, TestContainerd, build_image

REPO = Path(__file__).resolve().parents[2]
SNIPPETS = {2: REPO / "runtime_config" / "containerd-1.x.toml",
            3: REPO / "runtime_config" / "containerd-2.x.toml"}
CRI_NAMESPACE = "k8s.io"
PAUSE_REF = "docker.io/pyshim/pause:test"
PAUSE_ENTRYPOINT = ["/bin/sleep", "100000"]
SHIM_SOCKET_DIR = Path("/run/containerd/s")
# Handlers the snippets define, by the runtime they run.
HANDLERS = {"io.containerd.pyshim.v1": "pyshim", "io.containerd.runc.v2": "runc"}
CRI_DIR = "io.containerd.grpc.v1.cri"  # CRI's directory under containerd's root and state (1.6 to 2.x)
CRI_OBJECT_DIRS = {"sandboxes": "pod sandbox", "containers": "container"}  # in CRI_DIR, one directory per id


def config_version(config):
    match = re.search(r"^version\s*=\s*(\d+)", config, re.M)
    return int(match[1]) if match else 1


def cri_tables(version, workdir, sandbox_image):
    """The CRI plugin's config for containerd config `version` (2: containerd 1.x, 3: 2.x)."""
    snippet_path = SNIPPETS[version]
    snippet = snippet_path.read_text()
    defined = tomllib.loads(snippet)
    snippet = re.sub(r"^version\s*=.*$", f"# from {snippet_path.relative_to(REPO)}:", snippet, count=1, flags=re.M)
    q = _toml_string
    cni_bin, cni_conf = workdir / "cni" / "bin", workdir / "cni" / "conf"
    if version == 2:
        cri = defined["plugins"]["io.containerd.grpc.v1.cri"]
        prefix = '[plugins."io.containerd.grpc.v1.cri"'
        lines = [f"{prefix}]",
                 f"  sandbox_image = {q(sandbox_image)}",
                 "  restrict_oom_score_adj = true",
                 f"{prefix}.cni]",
                 f"  bin_dir = {q(str(cni_bin))}",
                 f"  conf_dir = {q(str(cni_conf))}"]
    else:
        cri = defined["plugins"]["io.containerd.cri.v1.runtime"]
        prefix = '[plugins."io.containerd.cri.v1.runtime"'
        lines = ['[plugins."io.containerd.cri.v1.images".pinned_images]',
                 f"  sandbox = {q(sandbox_image)}",
                 f"{prefix}]",
                 "  restrict_oom_score_adj = true",
                 f"{prefix}.cni]",
                 f"  bin_dirs = [{q(str(cni_bin))}]",
                 f"  conf_dir = {q(str(cni_conf))}"]
    if "runc" not in cri["containerd"]["runtimes"]:
        lines += [f"{prefix}.containerd.runtimes.runc]", '  runtime_type = "io.containerd.runc.v2"']
    return "\n".join(["# CRI (tests/cri/harness.py)", *lines, "", snippet])


def _toml_string(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def shim_socket(address, namespace, group):
    """The socket a shim of `group` listens on (containerd's naming, which pyshim and runc-v2 share)."""
    return SHIM_SOCKET_DIR / hashlib.sha256(os.path.join(address, namespace, group).encode()).hexdigest()


class CriContainerd(TestContainerd):
    """The CRI session's containerd (see the module docstring). `handler` is the CRI runtime
    handler of the runtime under test; `cgroup_parent` the pods' cgroup parent."""

    def __init__(self, workdir, runtime, **kwargs):
        super().__init__(workdir, runtime, **kwargs)
        if runtime not in HANDLERS:
            raise ValueError(f"no CRI runtime handler for {runtime} in runtime_config/ (known: {', '.join(HANDLERS)})")
        self.handler = HANDLERS[runtime]
        self.pause_image = PAUSE_REF
        self.cgroup_parent = "/pyshim-cri-" + uuid.uuid4().hex[:8]
        # The cgroup parent is a top-level cgroup like a namespace's: the leak check looks for
        # cgroups left in it, and the end of the session removes it.
        self.owned_namespaces.append(self.cgroup_parent.strip("/"))
        self.pods_dir = self.workdir / "pods"
        self.cri = None

    def start(self, timeout=30.0):
        self.cri_config = ""  # CRI on; then the CRI tables for the version of the config it writes
        self.cri_config = cri_tables(config_version(self.config()), self.workdir, self.pause_image)
        for directory in (self.workdir / "cni" / "bin", self.workdir / "cni" / "conf", self.pods_dir):
            directory.mkdir(parents=True, exist_ok=True)
        super().start(timeout)  # also imports the busybox image into the harness's own namespace
        pause = self.workdir / "pause.oci.tar"
        build_image(str(pause), ref=self.pause_image, entrypoint=PAUSE_ENTRYPOINT)
        self.import_image(pause, namespace=CRI_NAMESPACE)
        self.import_image(self.workdir / "busybox.oci.tar", namespace=CRI_NAMESPACE)
        self.cri = CriClient(self.address)
        return self

    def pod_log_directory(self, name):
        directory = self.pods_dir / name
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    # -- leaks --------------------------------------------------------------------------------

    def created_ids(self):
        return ([] if self.cri is None else self.cri.sandbox_ids + self.cri.container_ids)

    def find_leaks(self, *args, **kwargs):
        leaks = []
        if self.running() and self.cri is not None:
            leaks += [f"pod sandbox {p.id[:12]} ({p.metadata.name}) still exists in CRI"
                      for p in self.cri.list_pod_sandboxes()]
            leaks += [f"container {c.id[:12]} ({c.metadata.name}) still exists in CRI"
                      for c in self.cri.list_containers()]
        return leaks + super().find_leaks(*args, **kwargs)

    def host_leftovers(self):
        leaks = super().host_leftovers()
        leaks += [f"CRI {CRI_OBJECT_DIRS[p.parent.name]} directory left: {p}" for p in self._cri_object_dirs()]
        for cid in self.created_ids():
            if (RUNC_V2_ROOT / CRI_NAMESPACE / cid).exists():
                leaks.append(f"runc state left: {RUNC_V2_ROOT / CRI_NAMESPACE / cid}")
            if shim_socket(self.address, CRI_NAMESPACE, cid).exists():
                leaks.append(f"shim socket left: {shim_socket(self.address, CRI_NAMESPACE, cid)} (group {cid[:12]})")
        return leaks

    def _cri_object_dirs(self):
        return [p for top in (self.root, self.state) for kind in CRI_OBJECT_DIRS
                for p in (sorted((top / CRI_DIR / kind).iterdir()) if (top / CRI_DIR / kind).is_dir() else [])]

    def clean_leaks(self):
        if self.running() and self.cri is not None:
            for pod in self.cri.list_pod_sandboxes():
                for call in (self.cri.stop_pod_sandbox, self.cri.remove_pod_sandbox):
                    try:
                        call(pod.id)
                    except Exception:  # noqa: BLE001 - best effort; the generic cleanup follows
                        pass
        super().clean_leaks()
        for cid in self.created_ids():
            state = RUNC_V2_ROOT / CRI_NAMESPACE / cid
            if state.exists():
                subprocess.run(["runc", "--root", str(state.parent), "delete", "--force", cid],
                               capture_output=True, timeout=30)
                shutil.rmtree(state, ignore_errors=True)
            shim_socket(self.address, CRI_NAMESPACE, cid).unlink(missing_ok=True)
        for directory in self._cri_object_dirs():
            shutil.rmtree(directory, ignore_errors=True)

    def shutdown(self):
        try:
            super().shutdown()
        finally:
            if self.cri is not None:
                self.cri.close()
            if self.process is not None:  # the base shutdown raised before it stopped containerd
                self.stop()
                self.clean_leaks()
                self.cleanup(self.owned_namespaces)
            try:
                (RUNC_V2_ROOT / CRI_NAMESPACE).rmdir()  # only if empty: another containerd may use k8s.io too
            except OSError:
                pass
