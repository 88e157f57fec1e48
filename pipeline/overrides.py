"""Per-run overrides of params.yaml (`python -m pipeline.flows pipeline -S key=value`, the
pipeline flow's `overrides`), checked and written out for `dvc exp run -S` by the project.

DVC applies `-S` to any file (`dvc.yaml:stages.train.cmd=...` rewrites a command) in Hydra's
grammar (`+key`, `~key`, `${...}` interpolation), so the user's text never reaches DVC: an
override is one `section.key` of params.yaml (pipeline.params.section_keys) set to plain data,
re-serialised here, read back with DVC's own parser to confirm it means exactly that, and the
merged params must pass the pipeline's check. Anything else is refused with one line.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, NoReturn

from pipeline.params import ParamsError, check_pipeline, parse, read_yaml, section_keys
from pipeline.strict_yaml import StrictYAMLError, loads_strict

OVERRIDE_FORM = "section.key=value with a key of params.yaml (e.g. train.steps=500)"
PLAIN = ("plain YAML data: a number, true/false, null, one line of text without '${', "
         "or a list or mapping of those")
MAX_OVERRIDE_CHARS = 1000  # one override as DVC gets it; a params value is a few dozen characters
# Where files come from is not a per-run setting: anyone who can start a deployment could
# otherwise point the pipeline at other files or URLs. Edit params.yaml for these.
FIXED_SECTIONS = ("datasets",)
FIXED_KEYS = ("evaluate.lpips_url", "evaluate.lpips_sha256", "evaluate.fid_url", "evaluate.fid_sha256")
_KEY = re.compile(r"[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class OverrideError(ParamsError):
    """An override is not `section.key=value` of params.yaml with a plain value; the one-line message names it."""


def _refuse(shown: str, why: str) -> NoReturn:
    raise OverrideError(f"override {shown[:80] + '...' if len(shown) > 80 else shown!r}: {why}")


def _check_key(key: Any, shown: str) -> tuple[str, str]:
    """(section, name) of `key`, an overridable `section.key` of params.yaml; OverrideError otherwise."""
    keys = section_keys()
    form = f"use {OVERRIDE_FORM}, section one of {sorted(keys)}"
    section = re.match(r"\w*", key).group() if isinstance(key, str) else None
    if section in FIXED_SECTIONS:
        _refuse(shown, f"{section} cannot be overridden (it says which files and URLs the pipeline reads): "
                       f"edit params.yaml, or {form}")
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        _refuse(shown, f"{key!r} is not a key of params.yaml (no file prefix, no +, ~ or spaces); {form}")
    section, name = key.split(".")
    if section not in keys:
        _refuse(shown, f"unknown section {section!r}; {form}")
    if name not in keys[section]:
        _refuse(shown, f"unknown key {key}; allowed keys of {section}: {list(keys[section])}")
    if key in FIXED_KEYS:
        _refuse(shown, f"{key} says where a file is downloaded from and cannot be overridden: edit params.yaml")
    return section, name


def _value_problem(value: Any, depth: int = 0) -> str | None:
    """Why `value` is not plain override data (None if it is): scalars, or a list or mapping of scalars."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if -2**63 <= value < 2**63 else "an integer beyond 64 bits"
    if isinstance(value, float):
        return None if math.isfinite(value) else "a number that is not finite"
    if isinstance(value, str):
        if len(value) > MAX_OVERRIDE_CHARS:
            return f"text of {len(value)} characters (at most {MAX_OVERRIDE_CHARS})"
        if not value.isprintable():
            return "text with a line break or another control character"
        return "text with '${' (DVC would expand it)" if "${" in value else None
    if isinstance(value, (list, tuple, dict)) and depth == 0:
        if len(value) > MAX_OVERRIDE_CHARS // 2:
            return f"{len(value)} items (at most {MAX_OVERRIDE_CHARS // 2})"
        if isinstance(value, dict) and not all(isinstance(k, str) and _NAME.fullmatch(k) for k in value):
            return "a mapping whose keys are not plain names"
        items = value.values() if isinstance(value, dict) else value
        return next(filter(None, (_value_problem(v, 1) for v in items)), None)
    if isinstance(value, (list, tuple, dict)):
        return "a list or mapping inside another"
    return f"a {type(value).__name__}"


def override_value(value: Any) -> str:
    """`value` in the grammar of `dvc exp run -S key=value` (Hydra's): JSON, except unquoted dict keys."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {override_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(override_value(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def check_override(key: Any, value: Any, *, add: bool = False, shown: str | None = None) -> str:
    """`params.yaml:[+]key=value` for `dvc exp run -S`, once `key` and `value` pass the rules
    of `check_overrides`; OverrideError (one line, naming the override) otherwise. `add`: the
    key is absent from params.yaml (Hydra's `+key=` adds it; a plain `key=` would fail)."""
    shown = shown or f"{key}={value!r}"
    _check_key(key, shown)
    problem = _value_problem(value)
    if problem:
        _refuse(shown, f"the value is {problem}; it must be {PLAIN}")
    setting = f"{'+' if add else ''}{key}={override_value(value)}"
    if len(setting) > MAX_OVERRIDE_CHARS:
        _refuse(shown, f"{len(setting)} characters once written for DVC; at most {MAX_OVERRIDE_CHARS}")
    from hydra.core.override_parser.overrides_parser import OverridesParser  # what DVC parses -S with
    from hydra.core.override_parser.types import ValueType

    try:
        (parsed,) = OverridesParser.create().parse_overrides([setting])
        same = (parsed.key_or_group == key and parsed.package is None and parsed.is_add() == add
                and not parsed.is_delete() and parsed.value_type == ValueType.ELEMENT
                and json.dumps(parsed.value(), sort_keys=True) == json.dumps(value, sort_keys=True))
    except Exception:  # noqa: BLE001 -- any parse failure means DVC would not read it back either
        same = False
    if not same:
        _refuse(shown, f"DVC would not read this value back exactly; it must be {PLAIN}")
    return f"params.yaml:{setting}"


def check_overrides(overrides: Any) -> dict[str, Any]:
    """`overrides` ({"train.steps": 500, ...}) once every key is an overridable `section.key`
    of params.yaml and every value is plain data (`check_override`); OverrideError otherwise.

    Refused: keys with a file prefix (`dvc.yaml:...`), Hydra's `+`/`~` prefixes, spaces or
    other characters, unknown sections or keys, `datasets` and the download URLs (FIXED_*);
    values with line breaks, `${...}` (DVC would expand it) or over MAX_OVERRIDE_CHARS.
    Why so strict: DVC applies `-S` to any file, dvc.yaml's commands included.
    """
    if not isinstance(overrides, dict):
        raise OverrideError(f"overrides must be a mapping {{section.key: value}}, got {type(overrides).__name__}; "
                            f"each one {OVERRIDE_FORM}")
    for key, value in overrides.items():
        check_override(key, value)
    return dict(overrides)


def parse_cli_overrides(settings: list[str]) -> dict[str, Any]:
    """{key: value} from `-S key=value` texts (value in YAML, read like params.yaml: no aliases);
    OverrideError naming the first bad one (`check_overrides`' rules)."""
    overrides: dict[str, Any] = {}
    for text in settings:
        if len(text) > MAX_OVERRIDE_CHARS:
            _refuse(text, f"{len(text)} characters; at most {MAX_OVERRIDE_CHARS}")
        key, eq, value_text = text.partition("=")
        if not eq:
            _refuse(text, f"no '='; use {OVERRIDE_FORM}")
        _check_key(key, text)
        if key in overrides:
            _refuse(text, f"{key} is given twice; give each key once")
        try:
            value = loads_strict(value_text)
        except StrictYAMLError as err:
            _refuse(text, f"the value is {str(err)[:200]}; it must be {PLAIN}")
        check_override(key, value, shown=text)
        overrides[key] = value
    return overrides


def _has_key(raw: Any, key: str) -> bool:
    section, name = key.split(".")
    return isinstance(raw, dict) and isinstance(raw.get(section), dict) and name in raw[section]


def override_args(overrides: dict[str, Any], raw: Any) -> list[str]:
    """The `-S` values of `dvc exp run` for checked `overrides` on params mapping `raw`:
    written by the project (`check_override`), never the user's text."""
    return [check_override(key, value, add=not _has_key(raw, key)) for key, value in check_overrides(overrides).items()]


def check_params(path: Path, overrides: dict[str, Any]) -> None:
    """Raise ParamsError unless params.yaml, with `overrides` ({"train.steps": 500}) applied, passes
    the pipeline's check; OverrideError (a ParamsError) for a bad override or a bad merged value."""
    overrides = check_overrides(overrides)
    raw = read_yaml(path)
    if not overrides:
        check_pipeline(parse(raw))
        return
    if isinstance(raw, dict):  # a malformed file or section is left for parse to name
        raw = dict(raw)
        for key, value in overrides.items():
            section, name = key.split(".")
            if isinstance(raw.get(section) or {}, dict):
                raw[section] = {**(raw.get(section) or {}), name: value}
    try:
        check_pipeline(parse(raw))
    except OverrideError:
        raise
    except ParamsError as err:
        given = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
        raise OverrideError(f"with the overrides {given[:200]}: {err}") from None
