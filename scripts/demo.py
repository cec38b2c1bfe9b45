#!/usr/bin/env python3
"""Run one container with pyshim: the body of scripts/run.sh.

    demo.py [COMMAND [ARG...]]        (default: echo "hello from pyshim")

Builds the busybox image (scripts/build_image.py) and runs
`ctr run --rm --runtime $PYSHIM_RUNTIME IMAGE ID COMMAND...` with its output
shown as it comes; the exit status is ctr's.

* CONTAINERD_ADDRESS set: that containerd is used (namespace
  $CONTAINERD_NAMESPACE, default "default") and left running. Its PATH must
  hold the shim binary (run.sh links it into /usr/local/bin).
* Otherwise a private containerd is started under the subreaper, with its
  socket, root and state in a temporary directory under /run, and stopped and
  removed afterwards (scripts/private_containerd.py).

PYSHIM_RUNTIME selects the runtime (default io.containerd.pyshim.v1), e.g.
io.containerd.runc.v2 to compare with containerd's own shim.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from build_image import DEFAULT_REF, build_image
from private_containerd import PrivateContainerd, shim_binary_name

NAMESPACE = "pyshim-demo"


def say(msg):
    print(f"run.sh: {msg}", file=sys.stderr, flush=True)


def run_container(ctr_argv, env, runtime, command):
    container_id = f"pyshim-demo-{os.getpid()}"
    argv = ctr_argv("run", "--rm", "--runtime", runtime, DEFAULT_REF, container_id, *command)
    say("$ " + " ".join(argv))
    rc = subprocess.run(argv, stdin=subprocess.DEVNULL, env=env).returncode
    say(f"exit status {rc}")
    return rc


def with_configured_containerd(address, runtime, command, archive):
    namespace = os.environ.get("CONTAINERD_NAMESPACE") or "default"

    def ctr_argv(*args):
        return ["ctr", "--address", address, "--namespace", namespace, *args]

    say(f"using the containerd at {address} (namespace {namespace})")
    subprocess.run(ctr_argv("images", "import", archive), check=True, stdout=subprocess.DEVNULL)
    return run_container(ctr_argv, os.environ, runtime, command)


def with_private_containerd(runtime, command, archive, workdir):
    containerd = PrivateContainerd(workdir, namespace=NAMESPACE, path_prefix=[sysconfig.get_path("scripts")])
    shim = shutil.which(shim_binary_name(runtime), path=containerd.environ()["PATH"])
    if shim is None:
        say(f"warning: {shim_binary_name(runtime)} is not on containerd's PATH")
    say(f"starting a private containerd in {workdir}")
    try:
        containerd.start()
        containerd.import_image(archive)
        rc = run_container(containerd.ctr_argv, containerd.environ(), runtime, command)
        if rc != 0:
            kept = f"/tmp/pyshim-demo-{os.getpid()}.containerd.log"
            shutil.copy(containerd.log_path, kept)
            say(f"containerd log kept in {kept}")
    finally:
        leftovers = containerd.stop()
        leftovers += [f"mount {m}" for m in containerd.cleanup(namespaces=[NAMESPACE])]
        for line in leftovers:
            say(f"cleaned up after the run: {line}")
        say("stopped the private containerd")
    return rc


def main(argv):
    command = argv or ["echo", "hello from pyshim"]
    runtime = os.environ.get("PYSHIM_RUNTIME") or "io.containerd.pyshim.v1"
    workdir = tempfile.mkdtemp(prefix="pyshim-demo-", dir="/run")
    try:
        archive = os.path.join(workdir, "busybox.oci.tar")
        build_image(archive)
        address = os.environ.get("CONTAINERD_ADDRESS")
        if address:
            return with_configured_containerd(address, runtime, command, archive)
        return with_private_containerd(runtime, command, archive, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
