"""Reading the settings: the YAML file (duplicate keys refused) plus `FENCER_...` environment
variables and secret files, and errors that name the field and the file line, never a value."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError
from pydantic_settings import SettingsError as _SourceError

if TYPE_CHECKING:
    from fencing.settings import FencerSettings

# A directory of secret files, one per setting, named by the setting's path joined with "__"
# (`cloudstack__api_key`, `defaults__password`, `clusters__<uuid>__ipmi__password`); each file
# holds the value (a trailing newline is stripped). Docker/compose secrets land in /run/secrets.
SECRETS_DIR_ENV = "FENCER_SECRETS_DIR"


class SettingsError(Exception):
    """Bad settings: the message names the field (and the file line where known)."""


def _line_index(text: str, source: str) -> dict[tuple[str, ...], int]:
    """Map each key path in a YAML document to its 1-based line; refuse duplicate keys.

    PyYAML keeps the last of two equal keys without a word, so a second `hosts:` block would
    silently drop every host override above it: for fencing settings that is an error.
    """
    index: dict[tuple[str, ...], int] = {}
    seen: set[int] = set()

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if id(node) in seen:  # an alias: indexed where its anchor is (and may be recursive)
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            here: dict[str, int] = {}
            for k, v in node.value:
                name, line = str(k.value), k.start_mark.line + 1
                if name in here and name != "<<":
                    raise SettingsError(
                        f"{source} line {line}: duplicate key {'.'.join((*path, name))} "
                        f"(first at line {here[name]})"
                    )
                here[name] = line
                index[(*path, name)] = line
                walk(v, (*path, name))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                key = (*path, str(i))
                index[key] = v.start_mark.line + 1
                walk(v, key)

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return index


def _env_names() -> dict[str, str]:
    """FENCER_ variables present, by upper-case name (pydantic-settings ignores case)."""
    return {name.upper(): name for name in os.environ if name.upper().startswith("FENCER_")}


def _describe(err: ValidationError, lines: dict[tuple[str, ...], int], source: str) -> str:
    # Messages only, never the input: the bad value may be a password.
    env = _env_names()
    out = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        where = ""
        for n in range(len(loc), 0, -1):
            # The environment wins over the file, so a variable is the value's origin.
            var = env.get(("FENCER_" + "__".join(loc[:n])).upper())
            if var is not None:
                where = f" (environment {var})"
                break
            if loc[:n] in lines:
                where = f" ({source} line {lines[loc[:n]]})"
                break
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown setting"
        if not loc and e["type"] == "value_error":
            # A check across fields names its setting at the start of the message.
            for one in msg.removeprefix("Value error, ").splitlines():
                line = lines.get(tuple(one.split(":", 1)[0].split(".")))
                out.append(one + (f" ({source} line {line})" if line else ""))
            continue
        out.append(f"{'.'.join(loc) or '<root>'}: {msg}{where}")
    return "invalid settings:\n  " + "\n  ".join(out)


def load_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> FencerSettings:
    """Load settings from a YAML file (optional) plus the environment; raise SettingsError."""
    from fencing.settings import FencerSettings

    data: dict[str, Any] = {}
    lines: dict[tuple[str, ...], int] = {}
    source = "environment"
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise SettingsError(f"cannot read settings file {p}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise SettingsError(f"{p}: not UTF-8 text (byte {exc.start})") from None
        try:
            loaded = yaml.safe_load(text)
            lines = _line_index(text, source)
        except yaml.YAMLError as exc:
            # Only the problem and its line: the YAML snippet could hold a password.
            mark = getattr(exc, "problem_mark", None)
            at = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise SettingsError(f"{p}{at}: not valid YAML: {problem}") from None
        except RecursionError:
            raise SettingsError(f"{p}: nested too deeply to be a settings file") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise SettingsError(f"{p}: the top level must be a mapping of settings")
        data = loaded
    data.update(overrides)
    try:
        return FencerSettings(**data)
    except ValidationError as exc:
        raise SettingsError(_describe(exc, lines, source)) from None
    except _SourceError as exc:
        raise SettingsError(_describe_source_error(exc)) from None


def _describe_source_error(exc: Exception) -> str:
    """One line for a value pydantic-settings could not even decode (never the value)."""
    text = str(exc)
    field = re.search(r'field "([^"]+)"', text)
    if "EnvSettingsSource" in text and field is not None:
        prefix = f"FENCER_{field.group(1)}".upper()
        names = sorted(v for k, v in _env_names().items() if k.startswith(prefix))
        return (
            f"environment {', '.join(names) or prefix}: cannot parse the value of setting "
            f"{field.group(1)} (lists and mappings must be JSON, e.g. "
            """FENCER_EMAIL__TO='["ops@example.com"]')"""
        )
    return f"{SECRETS_DIR_ENV}: {text}"


def redacted_dump(settings: FencerSettings) -> dict[str, Any]:
    """The effective settings as plain data, every secret shown as '**********' or null."""
    return settings.model_dump(mode="json")
