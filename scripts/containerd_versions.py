#!/usr/bin/env python3
"""Fetch later containerd releases from Debian for the end-to-end matrix; install nothing.

    containerd_versions.py [--dir DIR] [SERIES ...]      (default: 1.7 2.1, DIR .work)

For each SERIES (e.g. 1.7, 2.1) it takes the newest `containerd` package of that series
found in Debian's later suites (trixie, trixie-backports, forky, sid), downloads it by
package name with a PRIVATE apt configuration, and unpacks it with `dpkg -x` into
`DIR/containerd-SERIES` (so `DIR/containerd-SERIES/usr/bin/{containerd,ctr,
containerd-shim-runc-v2}`). Nothing is installed system-wide, and the machine's own apt
state is neither read from nor written to, except for its sources list:

  * the private configuration (its own sources, lists, cache, empty preferences and
    dpkg status) lives in `DIR/apt`, removed again once the packages are unpacked;
  * its archive is this machine's own: the URI and Signed-By of the apt source whose
    suite is this system's codename (`VERSION_CODENAME` in /etc/os-release), read from
    /etc/apt/sources.list and /etc/apt/sources.list.d/*.{list,sources}. No host name is
    written down here. `PYSHIM_APT_URI` (and `PYSHIM_APT_SIGNED_BY`, a keyring) override it.

Idempotent and cached: a series whose unpacked `containerd --version` runs and matches
the recorded package version is left alone without touching the network. Concurrent runs
(several test sessions on one checkout) serialise on `DIR/containerd-versions.lock`.

Prints one line per series on stdout: `SERIES PACKAGE-VERSION BIN-DIR`. Exit status 1
(with the reason on stderr) if a series cannot be provided.

Standard library only.
"""
from __future__ import annotations

import argparse
import fcntl
import functools
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO / ".work"
DEFAULT_SERIES = ("1.7", "2.1")
LATER_SUITES = ("trixie", "trixie-backports", "forky", "sid")
PACKAGE = "containerd"
BINARIES = ("containerd", "ctr", "containerd-shim-runc-v2")
STAMP = "package-version"


def log(msg):
    print(f"containerd_versions: {msg}", file=sys.stderr, flush=True)


# -- this machine's archive -----------------------------------------------------------------


def codename():
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            key, _, value = line.partition("=")
            if key == "VERSION_CODENAME":
                return value.strip().strip("\"'")
    except OSError:
        pass
    return ""


def _deb822_stanzas(text):
    """The stanzas of a deb822 .sources file as {lowercased field: [first line, continuation lines...]}."""
    stanzas, current, last = [], {}, None
    for line in text.splitlines() + [""]:
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                stanzas.append(current)
            current, last = {}, None
        elif line[0] in " \t" and last:
            current[last].append(line)
        else:
            key, _, value = line.partition(":")
            last = key.strip().lower()
            current[last] = [value.strip()]
    return stanzas


def _one_line_entries(text):
    """`deb [opts] URI SUITE COMPONENT...` lines as (uri, suites, signed_by lines)."""
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        match = re.match(r"deb\s+(?:\[(?P<opts>[^\]]*)\]\s+)?(?P<uri>\S+)\s+(?P<suite>\S+)", line)
        if match:
            opts = dict(o.partition("=")[::2] for o in (match["opts"] or "").split())
            signed_by = opts.get("signed-by")
            yield match["uri"], [match["suite"]], [signed_by] if signed_by else []


def source_entries():
    """(uri, suites, signed_by lines) of every enabled `deb` source of this machine."""
    files = ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")
                                                + glob.glob("/etc/apt/sources.list.d/*.sources"))
    for path in files:
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        if not path.endswith(".sources"):
            yield from _one_line_entries(text)
            continue
        for stanza in _deb822_stanzas(text):
            if "deb" not in stanza.get("types", [""])[0].split():
                continue
            if stanza.get("enabled", ["yes"])[0].lower() == "no":
                continue
            uris = stanza.get("uris", [""])[0].split()
            if uris:
                yield uris[0], stanza.get("suites", [""])[0].split(), stanza.get("signed-by", [])


def machine_archive():
    """(uri, signed_by lines) of this system's own Debian archive."""
    if os.environ.get("PYSHIM_APT_URI"):
        signed_by = os.environ.get("PYSHIM_APT_SIGNED_BY")
        return os.environ["PYSHIM_APT_URI"], [signed_by] if signed_by else []
    name = codename()
    entries = list(source_entries())
    for uri, suites, signed_by in entries:
        if name and name in suites:
            return uri, signed_by
    for uri, suites, signed_by in entries:  # no codename match: a plain release suite
        if any(not re.search(r"-(security|updates|backports|proposed-updates)$", s) for s in suites) \
                and "security" not in uri:
            return uri, signed_by
    raise SystemExit(f"containerd_versions: no Debian `deb` source for {name or 'this release'} in "
                     "/etc/apt/sources.list{,.d}; set PYSHIM_APT_URI")


# -- the private apt configuration ------------------------------------------------------------


class PrivateApt:
    def __init__(self, root):
        self.root = Path(root)
        self.options = [
            "-o", f"Dir::Etc::SourceList={self.root / 'none.list'}",
            "-o", f"Dir::Etc::SourceParts={self.root / 'sources.list.d'}",
            "-o", f"Dir::Etc::Preferences={self.root / 'none.pref'}",
            "-o", f"Dir::Etc::PreferencesParts={self.root / 'preferences.d'}",
            "-o", f"Dir::State::Lists={self.root / 'lists'}",
            "-o", f"Dir::State::status={self.root / 'status'}",
            "-o", f"Dir::Cache={self.root / 'cache'}",
            "-o", "Acquire::Languages=none",
            "-o", "Acquire::PDiffs=false",
            "-o", "APT::Sandbox::User=root",  # the private dirs are root's
        ]
        self.updated = False

    def configure(self):
        uri, signed_by = machine_archive()
        arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                              check=True).stdout.strip()
        for sub in ("sources.list.d", "preferences.d", "lists/partial", "cache/archives/partial"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for empty in ("none.list", "none.pref", "status"):
            (self.root / empty).write_text("")
        lines = ["# generated by scripts/containerd_versions.py from this machine's apt sources",
                 "Types: deb", f"URIs: {uri}", f"Suites: {' '.join(LATER_SUITES)}",
                 "Components: main", f"Architectures: {arch}", "Targets: Packages"]
        if signed_by:
            lines.append(f"Signed-By: {signed_by[0]}")
            lines += signed_by[1:]  # an inline key keeps its continuation lines
        (self.root / "sources.list.d" / "later-suites.sources").write_text("\n".join(lines) + "\n")

    def run(self, tool, *args, cwd=None):
        result = subprocess.run([tool, *self.options, *args], capture_output=True, text=True, cwd=cwd)
        if result.returncode != 0:
            raise SystemExit(f"containerd_versions: {tool} {' '.join(args)} failed:\n"
                             f"{(result.stdout + result.stderr).strip()}")
        return result.stdout

    def update(self):
        if not self.updated:
            self.configure()
            log(f"apt-get update ({', '.join(LATER_SUITES)}) into {self.root}")
            self.run("apt-get", "-q", "update")
            self.updated = True

    def versions(self, package):
        """Every version of `package` the private lists know, newest first."""
        out = self.run("apt-cache", "madison", package)
        found = {line.split("|")[1].strip() for line in out.splitlines() if line.count("|") >= 2}
        return sorted(found, key=functools.cmp_to_key(_compare_versions), reverse=True)

    def download(self, package, version, into):
        self.run("apt-get", "-q", "download", f"{package}={version}", cwd=into)
        debs = list(Path(into).glob(f"{package}_*.deb"))
        if len(debs) != 1:
            raise SystemExit(f"containerd_versions: apt-get download {package}={version} left {debs}")
        return debs[0]


def _compare_versions(a, b):
    if a == b:
        return 0
    gt = subprocess.run(["dpkg", "--compare-versions", a, "gt", b]).returncode == 0
    return 1 if gt else -1


# -- one series ---------------------------------------------------------------------------------


def bin_dir(root, series):
    return Path(root) / f"containerd-{series}" / "usr" / "bin"


def daemon_version(binary):
    """`containerd --version`'s version word, or None if it does not run here."""
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    words = out.stdout.split()
    return words[2] if out.returncode == 0 and len(words) >= 3 else None


def in_series(version, series):
    return re.match(rf"{re.escape(series)}\.\d", version) is not None


def cached(root, series):
    """The package version already unpacked for `series` if it is complete and runs."""
    directory = Path(root) / f"containerd-{series}"
    try:
        package_version = (directory / STAMP).read_text().strip()
    except OSError:
        return None
    if not all((directory / "usr" / "bin" / b).is_file() for b in BINARIES):
        return None
    version = daemon_version(directory / "usr" / "bin" / "containerd")
    return package_version if version and in_series(version, series) else None


def provide(root, series, apt):
    """Make `root/containerd-<series>` hold the newest Debian containerd of `series`."""
    version = cached(root, series)
    if version:
        return version
    apt.update()
    candidates = [v for v in apt.versions(PACKAGE) if in_series(v, series)]
    if not candidates:
        raise SystemExit(f"containerd_versions: no containerd {series}.x in Debian {', '.join(LATER_SUITES)}")
    version = candidates[0]
    log(f"downloading containerd {version} (series {series})")
    with tempfile.TemporaryDirectory(dir=root, prefix=f".containerd-{series}.") as tmp:
        deb = apt.download(PACKAGE, version, tmp)
        unpacked = Path(tmp) / "root"
        subprocess.run(["dpkg", "-x", str(deb), str(unpacked)], check=True)
        missing = [b for b in BINARIES if not (unpacked / "usr" / "bin" / b).is_file()]
        if missing:
            raise SystemExit(f"containerd_versions: {deb.name} has no usr/bin/{', '.join(missing)}")
        ran = daemon_version(unpacked / "usr" / "bin" / "containerd")
        if not ran or not in_series(ran, series):
            raise SystemExit(f"containerd_versions: {deb.name}: `containerd --version` does not run "
                             f"here or is not {series}.x (got {ran!r})")
        (unpacked / STAMP).write_text(version + "\n")
        target = Path(root) / f"containerd-{series}"
        shutil.rmtree(target, ignore_errors=True)
        unpacked.rename(target)
    return version


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=str(DEFAULT_DIR), help="where to unpack (default %(default)s)")
    parser.add_argument("series", nargs="*", default=list(DEFAULT_SERIES), help="e.g. 1.7 2.1")
    args = parser.parse_args(argv)
    root = Path(args.dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    apt = PrivateApt(root / "apt")
    with open(root / "containerd-versions.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for series in args.series:
            version = provide(root, series, apt)
            print(f"{series} {version} {bin_dir(root, series)}")
        if apt.updated:
            shutil.rmtree(apt.root, ignore_errors=True)  # ~200 MB of package lists, not needed again
    return 0


if __name__ == "__main__":
    sys.exit(main())
