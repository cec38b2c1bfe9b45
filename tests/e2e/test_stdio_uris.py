"""stdio URIs besides FIFOs: `file://` (appended to a file) and `binary://` (a logging program the
shim starts, containerd's shim-logger protocol: container stdout on fd 3, stderr on fd 4, write or
close fd 5 when ready; CONTAINER_ID and CONTAINER_NAMESPACE in its environment)."""
import json
import sys

# The logger: copies fd 3 and fd 4 to files in the directory given as its `dir` argument, records
# its argv and environment, and exits once both reach end of file. It is asked to stop with SIGTERM
# when the task is deleted; it first finishes copying, as a logger should.
LOGGER = f"""#!{sys.executable}
import json, os, signal, sys, threading
signal.signal(signal.SIGTERM, signal.SIG_IGN)
args = sys.argv[1:]
out = args[args.index("dir") + 1]
with open(os.path.join(out, "logger.json"), "w") as f:
    json.dump({{"argv": args, "env": dict(os.environ)}}, f)
def copy(fd, name):
    with open(os.path.join(out, name), "wb") as f:
        while data := os.read(fd, 65536):
            f.write(data)
            f.flush()
threads = [threading.Thread(target=copy, args=(fd, name)) for fd, name in ((3, "stdout"), (4, "stderr"))]
for t in threads:
    t.start()
os.write(5, b"ready")
os.close(5)
for t in threads:
    t.join()
"""


def test_log_uri_file_appends_output(containerd, ctr, tmp_path):
    log = tmp_path / "new dir" / "container.log"  # the shim creates the directory
    uri = "file://" + str(log).replace(" ", "%20")
    for n in (1, 2):
        result = ctr("run", "--rm", "--log-uri", uri, "--runtime", containerd.runtime, containerd.image,
                     containerd.new_id(f"log-file-{n}"), "sh", "-c", f"echo out{n}; echo err{n} >&2; exit {n}")
        assert result == (n, "", "")
    lines = log.read_text().splitlines()
    # stdout and stderr are copied separately: their order within one run is not defined
    assert sorted(lines[:2]) == ["err1", "out1"] and sorted(lines[2:]) == ["err2", "out2"], lines


def test_log_uri_binary_runs_the_logger(containerd, ctr, cid, tmp_path):
    logger = tmp_path / "logger"
    logger.write_text(LOGGER)
    logger.chmod(0o755)
    uri = f"binary://{logger}?dir={tmp_path}"
    result = ctr("run", "--rm", "--log-uri", uri, "--runtime", containerd.runtime, containerd.image, cid,
                 "sh", "-c", "echo to stdout; seq 1 20000 >&2; exit 4")
    assert result == (4, "", "")
    # ctr returns after the task is deleted, and that stops the logger: it has written everything.
    assert (tmp_path / "stdout").read_text() == "to stdout\n"
    assert (tmp_path / "stderr").read_text() == "".join(f"{i}\n" for i in range(1, 20001))
    seen = json.loads((tmp_path / "logger.json").read_text())
    assert seen["argv"] == ["dir", str(tmp_path)]
    assert seen["env"]["CONTAINER_ID"] == cid
    assert seen["env"]["CONTAINER_NAMESPACE"] == containerd.namespace
