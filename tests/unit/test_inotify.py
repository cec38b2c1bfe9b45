"""shim/linux/inotify.py: a watch on a tree of sources, as the zygote keeps on its own code."""
import os

from shim.linux import inotify


def tree(tmp_path):
    (tmp_path / "pkg" / "sub" / "__pycache__").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("A = 1\n")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("B = 2\n")
    return tmp_path / "pkg"


def test_nothing_changed_reads_false(tmp_path):
    fd = inotify.watch_sources(str(tree(tmp_path)))
    try:
        assert not inotify.sources_changed(fd)
    finally:
        os.close(fd)


def test_bytecode_and_other_files_are_no_change(tmp_path):
    root = tree(tmp_path)
    fd = inotify.watch_sources(str(root))
    try:
        (root / "sub" / "__pycache__" / "b.cpython-311.pyc").write_bytes(b"\0" * 16)
        (root / "notes.txt").write_text("x")
        (root / "notes.txt").unlink()
        assert not inotify.sources_changed(fd)
    finally:
        os.close(fd)


def test_a_source_in_a_subdirectory_changed_added_or_removed(tmp_path):
    root = tree(tmp_path)
    for change in (lambda: os.utime(root / "sub" / "b.py"),
                   lambda: (root / "sub" / "b.py").write_text("B = 3\n"),
                   lambda: (root / "c.py").write_text(""),
                   lambda: (root / "a.py").unlink()):
        fd = inotify.watch_sources(str(root))
        try:
            change()
            assert inotify.sources_changed(fd)
            assert not inotify.sources_changed(fd)  # read: reported once
        finally:
            os.close(fd)


def test_events_parses_names_and_padding():
    one = inotify.EVENT.pack(3, inotify.IN_CREATE, 0, 16) + b"x.py".ljust(16, b"\0")
    two = inotify.EVENT.pack(4, inotify.IN_DELETE_SELF, 0, 0)
    assert list(inotify.events(one + two)) == [(3, inotify.IN_CREATE, "x.py"),
                                                (4, inotify.IN_DELETE_SELF, "")]
