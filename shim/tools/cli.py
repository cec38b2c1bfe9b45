"""`pyshim`: the project's commands for people (see each subcommand's module)."""

from __future__ import annotations

import argparse
import sys

from shim.tools import install


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyshim", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("install", help="install the shim for the node's containerd (or --check it)",
                            description=install.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="change nothing: say whether containerd uses the shim")
    install.add_arguments(p)
    p = commands.add_parser("uninstall", help="take out what install put in")
    install.add_arguments(p)
    args = parser.parse_args(argv)
    return install.run(args)


if __name__ == "__main__":
    sys.exit(main())
