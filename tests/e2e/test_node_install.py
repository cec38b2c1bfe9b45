"""`pyshim install`, `install --check` and `uninstall` against a private containerd started from
the config they edit: a fake /etc/containerd with an operator's config (CRI on, settings of
its own), never the machine's. containerd 2.x gets the drop-in and an `imports` line;
1.6/1.7 the block merged into the main config (with `runc`, which the operator's config lacks
and 1.6 needs to load CRI)."""
import subprocess
import sys
import tempfile

import psutil

from e2e import harness
from private_containerd import PrivateContainerd

PAUSE = "docker.io/pyshim/pause:test"


class NodeContainerd(harness.TestContainerd):
    """A containerd whose config is the file in the fake /etc: what the installer edited."""

    def __init__(self, workdir, runtime, etc, **kwargs):
        super().__init__(workdir, runtime, **kwargs)
        self.config_path = etc / "config.toml"

    def operator_config(self):
        """The node's config before pyshim: this harness's (private dirs, CRI on) plus CRI settings."""
        cni = self.workdir / "cni"
        for d in (cni / "bin", cni / "conf"):
            d.mkdir(parents=True, exist_ok=True)
        q = harness.json.dumps
        if self.major_version() >= 2:
            self.cri_config = "\n".join([
                '[plugins."io.containerd.cri.v1.images".pinned_images]', f"  sandbox = {q(PAUSE)}",
                '[plugins."io.containerd.cri.v1.runtime"]', "  restrict_oom_score_adj = true",
                '[plugins."io.containerd.cri.v1.runtime".cni]', f"  bin_dirs = [{q(str(cni / 'bin'))}]",
                f"  conf_dir = {q(str(cni / 'conf'))}", ""])
        else:
            self.cri_config = "\n".join([
                '[plugins."io.containerd.grpc.v1.cri"]', f"  sandbox_image = {q(PAUSE)}",
                "  restrict_oom_score_adj = true",
                '[plugins."io.containerd.grpc.v1.cri".cni]', f"  bin_dir = {q(str(cni / 'bin'))}",
                f"  conf_dir = {q(str(cni / 'conf'))}", ""])
        return PrivateContainerd.config(self)

    def config(self):
        return self.config_path.read_text()


def pyshim(*args):
    result = subprocess.run([sys.executable, "-m", "shim.tools.cli", *map(str, args)],
                            capture_output=True, text=True, timeout=120)
    return result.returncode, result.stdout + result.stderr


def test_install_check_uninstall_against_a_private_containerd(tmp_path):
    s = harness.settings()
    etc = tmp_path / "etc"
    etc.mkdir()
    node = NodeContainerd(tempfile.mkdtemp(prefix="pyshim-node-"), "io.containerd.pyshim.v1", etc,
                          containerd=s["containerd"], ctr=s["ctr"], log_level="info")
    original = node.operator_config()
    node.config_path.write_text(original)
    flags = ["--config", node.config_path, "--bin-dir", tmp_path / "bin", "--containerd", s["containerd"],
             "--ctr", s["ctr"], "--address", node.address]
    rc, out = pyshim("install", *flags)
    assert rc == 0, out
    shim = tmp_path / "bin" / "containerd-shim-pyshim-v1"
    assert f"wrote the shim's launcher: {shim}" in out
    assert f"backed up {node.config_path}" in out
    drop_in = etc / "conf.d" / "pyshim.toml"
    assert drop_in.exists() == (node.major_version() >= 2)
    assert (etc / "pyshim-runtimeclass.yaml").exists()
    rc, again = pyshim("install", *flags)
    assert (rc, again.splitlines()[0]) == (0, "nothing to change: pyshim is installed")
    try:
        node.start()
        rc, out = pyshim("install", "--check", *flags, "--image", node.image, "--namespace", node.namespace)
        assert rc == 0, out
        for line in ("ok:      the shim runs", "ok:      `containerd config dump` has handler 'pyshim'",
                     "ok:      containerd's CRI plugin is loaded", "ok:      a test container ran with the shim",
                     "pyshim is installed and containerd uses it"):
            assert line in out, out
        rc, out = pyshim("uninstall", *flags)
        assert rc == 0, out
        assert node.config_path.read_text() == original
        assert not drop_in.exists() and not shim.exists()
        # containerd still runs the old config: --check says what is wrong, in words.
        rc, out = pyshim("install", "--check", *flags)
        assert rc == 1
        assert "PROBLEM: the shim" in out and "does not run" in out
        assert "has no CRI runtime handler 'pyshim'" in out
        assert "was started before its config changed: restart it" in out
    finally:
        # The check's container left an idle zygote, which goes by itself 5 s after it is ready:
        # no need to wait for that here (test_zygote.py does).
        for proc in psutil.Process(node.process.pid).children() if node.process else []:
            if harness.command_line(proc)[-1:] == ["zygote"] and node.address in proc.cmdline():
                proc.kill()
                proc.wait(5)
        node.shutdown()  # raises if the check's container (or anything else) was left behind
