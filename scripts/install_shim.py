#!/usr/bin/env python3
"""Write the fast `containerd-shim-pyshim-v1` launcher and compile pyshim's bytecode.

The same launcher that an installed shim's first run writes over pip's console script
(shim/binary/launcher.py: `python -IS`, sys.path set to where shim and protobuf are
installed). setup.sh runs this so that the checkout's bytecode is compiled after every
change too.

    install_shim.py [DIR ...]    (default: the interpreter's own bin dir, i.e. the venv)

Run it with the interpreter that has pyshim and protobuf installed.
"""

from __future__ import annotations

import os
import sys
import sysconfig

from shim.binary import launcher


def main() -> int:
    for directory in sys.argv[1:] or [sysconfig.get_path("scripts")]:
        path = os.path.join(directory, launcher.NAME)
        launcher.write(path)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
