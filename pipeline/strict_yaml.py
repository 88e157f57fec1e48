"""Strict YAML reading: no aliases, no duplicate keys, no oversized files, one-line errors.

Aliases (`*name`) can expand a few bytes into gigabytes for any reader of the file (DVC
included), and with a duplicate key the later value would silently win. Numbers written
with an exponent and no dot (`1e-06`) are floats, as in YAML 1.2: DVC writes overridden
floats that way (`dvc exp run -S`), and PyYAML alone would read them as strings.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

MAX_FILE_BYTES = 1 << 20  # a params file is a few KB; anything near this is not one


class StrictYAMLError(ValueError):
    """The file is missing, too large, not YAML, or uses an alias or a duplicate key; names the file and line."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases and duplicate keys, naming the line."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise StrictYAMLError(f"line {mark.line + 1}: aliases (*name) are not allowed: a few of them can expand "
                                  "the file into gigabytes; write the values out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise StrictYAMLError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r} (the later one "
                                      "would silently win); keep one")
            seen.add(key)
        return super().construct_mapping(node, deep)


_StrictLoader.add_implicit_resolver(  # copies SafeLoader's resolvers first: SafeLoader is unchanged
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"))


def loads_strict(text: str) -> Any:
    """The YAML document in `text`, with the rules of `read_strict` (no aliases, no duplicate
    keys); StrictYAMLError with a one-line message otherwise."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except StrictYAMLError:
        raise
    except yaml.YAMLError as err:
        problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
        detail = f"line {mark.line + 1}: {problem}" if problem and mark else " ".join(str(err).split())
        raise StrictYAMLError(f"not valid YAML ({detail})") from None


def read_strict(path: str | Path, *, what: str = "YAML file") -> Any:
    """The YAML document at `path`; StrictYAMLError ("<path>: ...") if it is missing, over
    MAX_FILE_BYTES, invalid, or uses an alias or a duplicate key. `what` names the file's kind."""
    path = Path(path)
    if not path.is_file():
        raise StrictYAMLError(f"{path}: no such {what}")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise StrictYAMLError(f"{path}: {path.stat().st_size} bytes, too large for a {what} (at most {MAX_FILE_BYTES})")
    try:
        return loads_strict(path.read_text())
    except StrictYAMLError as err:  # the loader names the line
        raise StrictYAMLError(f"{path}: {err}") from None
