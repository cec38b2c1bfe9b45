#!/usr/bin/env python3
"""Build a tiny busybox OCI image archive for the demo and the end-to-end tests.

The image holds the static busybox from Debian's `busybox-static` package as
/bin/busybox, a symlink for every applet it lists (`busybox --list-full`), and
minimal /etc/passwd and /etc/group so that `id` works. Its config runs `sh`
with a usual PATH.

The output is an OCI image layout packed as a tar archive (oci-layout,
index.json, blobs/sha256/...), which `ctr images import` accepts; the index
carries the image name in the `io.containerd.image.name` annotation. Only the
standard library is used, and the archive is reproducible: the same busybox
binary always gives the same digests.

    build_image.py OUT.tar [--busybox /bin/busybox] [--ref docker.io/pyshim/busybox:test]
                   [--entrypoint /bin/sleep 100000]

With `--entrypoint` the config runs that instead of `sh`: the tests' CRI pause image is this
image with the entrypoint `/bin/sleep 100000` (a sandbox image only has to never exit).
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import platform
import struct
import subprocess
import sys
import tarfile

DEFAULT_REF = "docker.io/pyshim/busybox:test"
DEFAULT_BUSYBOX = "/bin/busybox"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EPOCH = "1970-01-01T00:00:00Z"

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

# Directories every container expects; runc mounts proc, sys and dev over theirs.
DIRS = {
    "bin": 0o755, "sbin": 0o755, "usr": 0o755, "usr/bin": 0o755, "usr/sbin": 0o755,
    "etc": 0o755, "dev": 0o755, "proc": 0o555, "sys": 0o555, "root": 0o700,
    "tmp": 0o1777, "var": 0o755, "var/tmp": 0o1777, "run": 0o755,
}
FILES = {
    "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    "etc/group": b"root:x:0:\nnobody:x:65534:\n",
}


def oci_arch():
    """The OCI architecture name of this machine (what `ctr images import` selects by default)."""
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(machine, machine)


def is_static_elf(data):
    """True if the ELF binary has no PT_INTERP program header (needs no dynamic loader)."""
    if data[:4] != b"\x7fELF":
        return False
    order = "<" if data[5] == 1 else ">"
    if data[4] == 2:  # 64-bit
        phoff, = struct.unpack_from(order + "Q", data, 0x20)
        phentsize, phnum = struct.unpack_from(order + "HH", data, 0x36)
    else:
        phoff, = struct.unpack_from(order + "I", data, 0x1C)
        phentsize, phnum = struct.unpack_from(order + "HH", data, 0x2A)
    pt_interp = 3
    return all(struct.unpack_from(order + "I", data, phoff + i * phentsize)[0] != pt_interp for i in range(phnum))


def applet_paths(busybox):
    """Paths (relative, e.g. 'usr/bin/head') of all applets the busybox binary provides."""
    out = subprocess.run([busybox, "--list-full"], check=True, capture_output=True, text=True).stdout
    return sorted({p.strip("/") for p in out.split() if p.strip("/") not in ("bin/busybox", "linuxrc")})


def _tarinfo(name, kind, mode, size=0, linkname=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.linkname = linkname
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def layer_tar(busybox):
    """The uncompressed layer tar: directories, busybox, applet symlinks, /etc files."""
    with open(busybox, "rb") as f:
        binary = f.read()
    if not is_static_elf(binary):
        raise SystemExit(f"build_image: {busybox} is not a static binary (install the busybox-static package)")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, mode in sorted(DIRS.items()):
            tar.addfile(_tarinfo(name, tarfile.DIRTYPE, mode))
        tar.addfile(_tarinfo("bin/busybox", tarfile.REGTYPE, 0o755, len(binary)), io.BytesIO(binary))
        for path in applet_paths(busybox):
            if os.path.dirname(path) not in DIRS:
                raise SystemExit(f"build_image: applet directory not in the image: {path}")
            tar.addfile(_tarinfo(path, tarfile.SYMTYPE, 0o777, linkname="/bin/busybox"))
        for name, data in sorted(FILES.items()):
            tar.addfile(_tarinfo(name, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
    return buf.getvalue()


def _blob(data, media_type):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    return {"mediaType": media_type, "digest": digest, "size": len(data)}, data


def _json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def build_image(out_path, busybox=DEFAULT_BUSYBOX, ref=DEFAULT_REF, entrypoint=None):
    """Write the OCI archive to out_path; return the manifest descriptor (dict). `entrypoint`
    (a list) replaces the default command `sh`."""
    arch = oci_arch()
    layer = layer_tar(busybox)
    layer_desc, layer_gz = _blob(gzip.compress(layer, mtime=0), MEDIA_LAYER)
    config = {
        "architecture": arch,
        "os": "linux",
        "created": EPOCH,
        "config": ({"Env": [PATH_ENV], "Cmd": ["sh"], "WorkingDir": "/"} if entrypoint is None else
                   {"Env": [PATH_ENV], "Entrypoint": list(entrypoint), "WorkingDir": "/"}),
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
        "history": [{"created": EPOCH, "created_by": "pyshim scripts/build_image.py"}],
    }
    config_desc, config_data = _blob(_json(config), MEDIA_CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": MEDIA_MANIFEST, "config": config_desc, "layers": [layer_desc]}
    manifest_desc, manifest_data = _blob(_json(manifest), MEDIA_MANIFEST)
    tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else "latest"
    manifest_desc = dict(manifest_desc, platform={"architecture": arch, "os": "linux"},
                         annotations={"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": tag})
    index = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [manifest_desc]}

    entries = [("oci-layout", _json({"imageLayoutVersion": "1.0.0"})), ("index.json", _json(index)), ("blobs", None),
               ("blobs/sha256", None)]
    for desc, data in ((layer_desc, layer_gz), (config_desc, config_data), (manifest_desc, manifest_data)):
        entries.append(("blobs/sha256/" + desc["digest"].split(":", 1)[1], data))
    tmp = out_path + ".tmp"
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries:
            if data is None:
                tar.addfile(_tarinfo(name, tarfile.DIRTYPE, 0o755))
            else:
                tar.addfile(_tarinfo(name, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
    os.replace(tmp, out_path)
    return manifest_desc


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="path of the OCI archive to write")
    parser.add_argument("--busybox", default=DEFAULT_BUSYBOX, help="static busybox binary (default %(default)s)")
    parser.add_argument("--ref", default=DEFAULT_REF, help="image name stored in the archive (default %(default)s)")
    parser.add_argument("--entrypoint", nargs="+", metavar="ARG", help="the image's entrypoint (default: cmd sh)")
    args = parser.parse_args(argv)
    desc = build_image(args.out, args.busybox, args.ref, args.entrypoint)
    print(f"{args.out}: {args.ref} {desc['digest']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
