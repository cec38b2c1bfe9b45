"""containerd's config for pyshim's CRI runtime handler, edited as text.

The operator's file keeps its comments and layout: each edit is one piece, marked, that
`remove_*` takes out again exactly, so that install then uninstall gives back the same
bytes. Every result is parsed again before it is returned: an edit that would leave
invalid TOML, or a handler defined twice, is refused with a ConfigError saying what to do.

- containerd 2.x reads `imports`: the handler goes into a drop-in file, and the main config
  only gets the drop-in's path in its `imports` (unless an existing import already covers it).
- containerd 1.6/1.7 replace a plugin's whole table with an imported file's, so a drop-in
  would drop the operator's CRI settings: there the handler's tables are merged into the
  main config as one marked block.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import tomllib
from importlib import resources

BLOCK_BEGIN = "# BEGIN pyshim runtime handler (written by `pyshim install`; `pyshim uninstall` removes it)"
BLOCK_END = "# END pyshim runtime handler"
IMPORT_MARK = "  # pyshim install"
CREATED = "# containerd config created by `pyshim install` (`pyshim uninstall` removes it)"
DROP_IN_HEADER = "# pyshim runtime handler: written by `pyshim install`, removed by `pyshim uninstall`"
# The CRI plugin that holds runtime handlers, by config version.
CRI_PLUGIN = {2: "io.containerd.grpc.v1.cri", 3: "io.containerd.cri.v1.runtime"}
SNIPPET = {2: "containerd-1.x.toml", 3: "containerd-2.x.toml"}


class ConfigError(Exception):
    """A config this module will not edit; the message says why, in plain words."""


def shipped(name: str) -> str:
    """A file of runtime_config/, shipped inside the package."""
    return resources.files("shim.tools").joinpath("runtime_config", name).read_text()


def parse(text: str, path: str = "the config") -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML ({e}); fix it first") from None


def version(text: str, path: str = "the config") -> int:
    return int(parse(text, path).get("version", 1))


def q(value: str) -> str:
    return json.dumps(value)  # a JSON string is a TOML basic string


def handler_tables(config_version: int, handler: str, runtime_path: str, with_runc: bool) -> str:
    """The snippet's tables (no `version` line) for `handler`, with `runtime_path` set; the
    1.x snippet's `runc` table only `with_runc`."""
    text = shipped(SNIPPET[config_version])
    text = text[text.index("\n["):].lstrip("\n")  # the tables, without the file's own header
    text = text.replace(".runtimes.pyshim", f".runtimes.{handler}")
    text = re.sub(r"^(\s*)# runtime_path = .*$", lambda m: f"{m[1]}runtime_path = {q(runtime_path)}",
                  text, count=1, flags=re.M)
    if not with_runc:
        text = text[:text.index("# containerd 1.6 refuses")] if "# containerd 1.6 refuses" in text else text
    return text.rstrip("\n") + "\n"


def handler(data: dict, config_version: int, name: str) -> dict | None:
    """The CRI runtime handler `name` in a parsed config (or `containerd config dump`)."""
    plugin = data.get("plugins", {}).get(CRI_PLUGIN[config_version], {})
    return plugin.get("containerd", {}).get("runtimes", {}).get(name)


def needs_runc(data: dict) -> bool:
    """containerd 1.6 does not load CRI when a runtime is defined and the default (runc) is not."""
    cri = data.get("plugins", {}).get(CRI_PLUGIN[2], {}).get("containerd", {})
    return cri.get("default_runtime_name", "runc") == "runc" and "runc" not in cri.get("runtimes", {})


# -- containerd 1.6 / 1.7: one block in the main config ----------------------------------------

def add_block(text: str, tables: str, name: str, path: str = "the config") -> str:
    """`text` with the handler's `tables` as the marked block (replaced if there is one)."""
    base = remove_block(text)
    data = parse(base, path)
    if handler(data, 2, name) is not None:
        raise ConfigError(f"{path} already defines the CRI runtime handler {name!r} itself; remove it, "
                          f"or merge the snippet by hand")
    if base and not base.endswith("\n"):
        base += "\n"
    result = f"{base}\n{BLOCK_BEGIN}\n{tables}{BLOCK_END}\n"
    try:
        tomllib.loads(result)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"adding the handler's tables to {path} would make it invalid ({e}): "
                          f"merge the snippet by hand") from None
    return result


def remove_block(text: str) -> str:
    start = text.find(f"\n{BLOCK_BEGIN}\n")
    if start < 0:
        return text
    end = text.index(f"{BLOCK_END}\n", start) + len(BLOCK_END) + 1
    return text[:start] + text[end:]


# -- containerd 2.x: a drop-in, and its path in the main config's imports ------------------------

def drop_in(config_version: int, tables: str) -> str:
    return f"{DROP_IN_HEADER}\nversion = {config_version}\n\n{tables}"


def imported(text: str, config_path: str, path: str) -> bool:
    """Whether containerd, reading `text` from `config_path`, imports the file `path`
    (relative imports are relative to the config's directory; `*` globs)."""
    for entry in parse(text, config_path).get("imports", []):
        entry = os.path.normpath(os.path.join(os.path.dirname(config_path), entry))
        if entry == path or ("*" in entry and fnmatch.fnmatchcase(path, entry)):
            return True
    return False


_IMPORTS = re.compile(r"^imports\s*=\s*\[", re.M)


def _top_level_end(text: str) -> int:
    """Where the first table header begins (top-level keys must come before it)."""
    match = re.search(r"^\s*\[", text, re.M)
    return match.start() if match else len(text)


def add_import(text: str, path: str, config_path: str = "the config") -> str:
    if imported(text, config_path, path):
        return text
    match = _IMPORTS.search(text, 0, _top_level_end(text))
    if match:  # insert first in the existing list
        rest = text[match.end():]
        item = q(path) if rest.lstrip().startswith("]") else q(path) + ", "
        result = text[:match.end()] + item + rest
    elif "imports" in parse(text, config_path):
        raise ConfigError(f"cannot find the `imports` line of {config_path}: add {q(path)} to it by hand")
    else:  # a new line, after `version = N` if the file starts with one
        line = f"imports = [{q(path)}]{IMPORT_MARK}\n"
        version_line = re.search(r"^version\s*=.*\n", text[:_top_level_end(text)], re.M)
        at = version_line.end() if version_line else 0
        result = text[:at] + line + text[at:]
    if not imported(result, config_path, path):
        raise ConfigError(f"could not add {path} to the imports of {config_path}: add it by hand")
    return result


def remove_import(text: str, path: str) -> str:
    line = f"imports = [{q(path)}]{IMPORT_MARK}\n"
    if line in text:
        return text.replace(line, "", 1)
    match = _IMPORTS.search(text, 0, _top_level_end(text))
    if match:
        for item in (q(path) + ", ", q(path)):
            if text.startswith(item, match.end()):
                return text[:match.end()] + text[match.end() + len(item):]
    return text


def new_main_config(config_version: int) -> str:
    return f"{CREATED}\nversion = {config_version}\n"


def runtimeclass(name: str) -> str:
    return shipped("runtimeclass.yaml").replace("name: pyshim", f"name: {name}").replace(
        "handler: pyshim", f"handler: {name}")
