"""The node installer's config editing (shim/tools/containerd_config.py, shim/tools/install.py):
merges keep the operator's config, a backup is kept, a second install changes nothing, and
uninstall gives back the original bytes."""
import tomllib
from types import SimpleNamespace

import pytest

from shim.tools import containerd_config as cc
from shim.tools import install

OPERATOR_1X = '''version = 2
# the operator's own settings
[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = true
'''
OPERATOR_2X = '''version = 3
[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
'''


def test_1x_block_merges_beside_the_operators_tables_and_comes_out_exactly():
    tables = cc.handler_tables(2, "pyshim", "/opt/bin/containerd-shim-pyshim-v1", with_runc=False)
    merged = cc.add_block(OPERATOR_1X, tables, "pyshim")
    data = tomllib.loads(merged)
    runtimes = data["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]
    assert runtimes["pyshim"] == {"runtime_type": "io.containerd.pyshim.v1",
                                  "runtime_path": "/opt/bin/containerd-shim-pyshim-v1"}
    assert runtimes["runc"]["options"] == {"SystemdCgroup": True}
    assert data["plugins"]["io.containerd.grpc.v1.cri"]["restrict_oom_score_adj"] is True
    assert merged.startswith(OPERATOR_1X)
    assert cc.add_block(merged, tables, "pyshim") == merged  # idempotent
    assert cc.remove_block(merged) == OPERATOR_1X


def test_1x_block_adds_runc_only_when_the_config_lacks_it():
    assert not cc.needs_runc(tomllib.loads(OPERATOR_1X))
    bare = 'version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n  restrict_oom_score_adj = true\n'
    assert cc.needs_runc(tomllib.loads(bare))
    tables = cc.handler_tables(2, "pyshim", "/x", with_runc=True)
    runtimes = tomllib.loads(cc.add_block(bare, tables, "pyshim"))["plugins"]["io.containerd.grpc.v1.cri"][
        "containerd"]["runtimes"]
    assert runtimes["runc"] == {"runtime_type": "io.containerd.runc.v2"}


def test_1x_refuses_a_handler_the_operator_defined():
    own = OPERATOR_1X + '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.pyshim]\n  runtime_type = "x"\n'
    with pytest.raises(cc.ConfigError, match="already defines"):
        cc.add_block(own, cc.handler_tables(2, "pyshim", "/x", False), "pyshim")


@pytest.mark.parametrize("before, expect", [
    (OPERATOR_2X, ['/etc/containerd/conf.d/pyshim.toml']),
    ('version = 3\nimports = ["/etc/other.toml"]\n[grpc]\n  address = "/a"\n',
     ['/etc/containerd/conf.d/pyshim.toml', '/etc/other.toml']),
    ('version = 3\nimports = []\n', ['/etc/containerd/conf.d/pyshim.toml']),
])
def test_2x_import_added_and_removed_exactly(before, expect):
    path = "/etc/containerd/conf.d/pyshim.toml"
    after = cc.add_import(before, path, "/etc/containerd/config.toml")
    assert tomllib.loads(after)["imports"] == expect
    assert cc.add_import(after, path, "/etc/containerd/config.toml") == after
    assert cc.remove_import(after, path) == before


def test_2x_an_existing_glob_import_is_enough():
    text = 'version = 3\nimports = ["conf.d/*.toml"]\n'
    assert cc.imported(text, "/etc/containerd/config.toml", "/etc/containerd/conf.d/pyshim.toml")
    assert cc.add_import(text, "/etc/containerd/conf.d/pyshim.toml", "/etc/containerd/config.toml") == text


def test_invalid_toml_is_refused_in_plain_words():
    with pytest.raises(cc.ConfigError, match="not valid TOML"):
        cc.add_import("version = [", "/x.toml", "/etc/containerd/config.toml")


def fake_containerd(tmp_path, version):
    script = tmp_path / "containerd"
    script.write_text(f"#!/bin/sh\necho containerd github.com/containerd/containerd {version} abc\n")
    script.chmod(0o755)
    return str(script)


def plan(tmp_path, version):
    args = SimpleNamespace(config=str(tmp_path / "etc" / "config.toml"), drop_in=None,
                           bin_dir=str(tmp_path / "bin"), no_bin=False, manifest=None,
                           containerd=fake_containerd(tmp_path, version), ctr=None, address="/nonexistent",
                           namespace="default", handler="pyshim", image=None)
    return install.plan_from(args)


@pytest.mark.parametrize("version, original", [("1.6.20", OPERATOR_1X), ("2.1.9", OPERATOR_2X)])
def test_install_backs_up_is_idempotent_and_uninstall_restores(tmp_path, capsys, version, original):
    p = plan(tmp_path, version)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "config.toml").write_text(original)
    assert install.install(p) == 0
    first = capsys.readouterr().out
    assert f"backed up {p.config} to {p.backup}" in first
    assert open(p.backup).read() == original
    config = open(p.config).read()
    assert config != original
    assert "runtime_path" in (open(p.drop_in).read() if version.startswith("2") else config)
    assert open(p.manifest).read().count("handler: pyshim") == 1
    assert install.launcher.is_launcher(p.shim)
    assert install.install(p) == 0  # a second run changes nothing
    assert "nothing to change" in capsys.readouterr().out
    assert open(p.config).read() == config
    assert install.uninstall(p) == 0
    out = capsys.readouterr().out
    assert open(p.config).read() == original
    for gone in (p.backup, p.drop_in, p.manifest, p.shim):
        assert not (tmp_path / gone).exists(), out
    assert install.uninstall(p) == 0
    assert "nothing to change" in capsys.readouterr().out


def test_a_config_changed_after_install_keeps_its_backup(tmp_path, capsys):
    p = plan(tmp_path, "1.6.20")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "config.toml").write_text(OPERATOR_1X)
    install.install(p)
    with open(p.config, "a") as f:
        f.write('\n[debug]\n  level = "info"\n')
    install.uninstall(p)
    assert "kept" in capsys.readouterr().out
    assert open(p.backup).read() == OPERATOR_1X
    assert open(p.config).read() == OPERATOR_1X + '\n[debug]\n  level = "info"\n'


@pytest.mark.parametrize("version", ["1.7.24", "2.1.9"])
def test_no_config_yet_is_created_and_removed_again(tmp_path, version):
    p = plan(tmp_path, version)
    install.install(p)
    data = tomllib.loads(open(p.config).read())
    assert data["version"] == (3 if version.startswith("2") else 2)
    assert not (tmp_path / "etc" / "config.toml.pyshim-backup").exists()
    install.uninstall(p)
    assert not (tmp_path / "etc" / "config.toml").exists()
