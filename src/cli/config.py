"""Pipeline files: the settings of ``onnxopt run`` in TOML (Python 3.11+) or JSON, read and written.

Keys are the long flags of ``run`` without their dashes (``keep-going``, ``external-data``), plus
``verify`` for ``--no-verify``, ``dims`` and ``tolerances`` as tables; see docs/pipeline-files.md.
Paths in a file are relative to the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from onnxopt import spec as spec_mod
from onnxopt.errors import UsageError
from onnxopt.metrics import Tolerance
from onnxopt.pass_api import format_value

KINDS = ("exact", "approximate", "interface")
SUFFIXES = (".toml", ".json")


@dataclasses.dataclass
class RunConfig:
    """Everything ``onnxopt run`` takes besides MODEL and OUTPUT; paths absolute or cwd-relative."""

    passes: str = "simplify"
    golden: Path | None = None
    target: str | None = None
    verify: bool = True
    keep_going: bool = False
    report: Path | None = None
    external_data: bool | None = None
    dims: dict[str, int] = dataclasses.field(default_factory=dict)
    seed: int = 0
    plugins: list[str] = dataclasses.field(default_factory=list)
    tolerances: dict[str, dict[str, float | None]] = dataclasses.field(default_factory=dict)


FIELDS = [f.name for f in dataclasses.fields(RunConfig)]
KEYS = [name.replace("_", "-") for name in FIELDS]


def merge(file_values: dict[str, Any], flags: dict[str, Any]) -> RunConfig:
    """Defaults, then the file, then flags given on the command line.

    ``dims`` and ``tolerances`` merge name by name; ``plugins`` from both are loaded.
    """
    config = RunConfig()
    for layer in (file_values, flags):
        for name, value in layer.items():
            if name == "dims":
                config.dims = {**config.dims, **value}
            elif name == "tolerances":
                for kind, overrides in value.items():
                    config.tolerances[kind] = {**config.tolerances.get(kind, {}), **overrides}
            elif name == "plugins":
                config.plugins = list(dict.fromkeys([*config.plugins, *value]))
            else:
                setattr(config, name, value)
    return config


def read(path: Path) -> dict[str, Any]:
    """The settings a pipeline file sets, as RunConfig field names; errors name the file."""
    data = _load(path)
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a table of settings at the top")
    values: dict[str, Any] = {}
    for key, raw in data.items():
        if key not in KEYS:
            raise UsageError(f"{path}: unknown key '{key}'" + _suggest(key, KEYS, "keys"))
        name = key.replace("-", "_")
        values[name] = _CHECKS[name](raw, path, key)
    return values


def write(config: RunConfig, path: Path, protected: tuple[Path, ...] = ()) -> Path:
    """Write ``config`` as TOML or JSON (by suffix), atomically; paths relative to the file."""
    from onnxopt import model_io

    path = Path(path).absolute()
    if path.suffix not in SUFFIXES:
        raise UsageError(f"--save-config: expected a .toml or .json file, got {path.name}")
    model_io.check_writable(path, protected)
    data = to_dict(config, path.parent)
    text = to_toml(data) if path.suffix == ".toml" else json.dumps(data, indent=2) + "\n"
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def to_dict(config: RunConfig, folder: Path) -> dict[str, Any]:
    """The file's content: defaults and unset values left out, paths relative to ``folder``."""
    defaults = RunConfig()
    data: dict[str, Any] = {}
    for name, key in zip(FIELDS, KEYS, strict=True):
        value = getattr(config, name)
        if value is None or value == getattr(defaults, name):
            continue
        if name in ("golden", "report") or (name == "target" and Path(value).suffix in SUFFIXES):
            value = _relative(value, folder)
        elif name == "plugins":
            value = [_relative(p, folder) if p.endswith(".py") else p for p in value]
        elif name == "tolerances":
            value = {
                kind: {k: "none" if v is None else v for k, v in overrides.items()}
                for kind, overrides in value.items()
            }
        data[key] = value
    return data


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """TOML for the simple values a pipeline file holds; tables after plain keys."""
    plain = {k: v for k, v in data.items() if not isinstance(v, dict)}
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in plain.items()]
    for key, table in data.items():
        if isinstance(table, dict):
            header = f"{prefix}{_toml_key(key)}"
            flat = {k: v for k, v in table.items() if not isinstance(v, dict)}
            if flat or not table:
                lines += ["", f"[{header}]", to_toml(flat).rstrip("\n")]
            nested = {k: v for k, v in table.items() if isinstance(v, dict)}
            if nested:
                lines += ["", to_toml(nested, f"{header}.").strip("\n")]
    return "\n".join(lines).strip("\n") + "\n"


def passes_spec(raw: Any, path: Path, key: str = "passes") -> str:
    """A spec string, or a list of tables ``{name = "fuse", target = "onnx-17"}``, as a spec.

    Pass names and options are checked when the spec is built, after plugins are loaded.
    """
    if isinstance(raw, str):
        try:
            spec_mod.parse(raw)  # syntax now; names once plugins are loaded
        except UsageError as err:
            raise UsageError(f"{path}: {key}: {err}") from None
        return raw
    if not isinstance(raw, list) or not raw:
        raise UsageError(f"{path}: '{key}' must be a spec string or a list of tables")
    items = []
    for index, table in enumerate(raw):
        where = f"{path}: {key}[{index}]"
        if not isinstance(table, dict) or not isinstance(table.get("name"), str):
            raise UsageError(f"{where}: expected a table with a string 'name'")
        options = []
        for option, value in table.items():
            if option == "name":
                continue
            if isinstance(value, dict) or (
                isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value)
            ):
                raise UsageError(f"{where}: option '{option}' must be a value or a list of values")
            options.append(f"{option}={format_value(value)}")
        items.append(table["name"] + (f"({','.join(options)})" if options else ""))
    return ",".join(items)


def _load(path: Path) -> Any:
    if path.suffix not in SUFFIXES:
        raise UsageError(f"--config: expected a .toml or .json file, got {path.name}")
    if not path.is_file():
        raise UsageError(f"pipeline file not found: {path}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read {path}: {err}") from None
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except ValueError as err:
            raise UsageError(f"{path} is not valid JSON: {err}") from None
    try:
        import tomllib
    except ImportError:
        raise UsageError(
            f"{path}: TOML pipeline files need Python 3.11+; write {path.stem}.json instead"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"{path} is not valid TOML: {err}") from None


def _suggest(word: str, choices: list[str], what: str) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; known {what}: {', '.join(choices)}"


def _relative(value: str | Path, folder: Path) -> str:
    """Relative to ``folder`` when they share more than the root, else absolute."""
    path = Path(value).absolute()
    if Path(os.path.commonpath([path, folder])) == Path(path.anchor):
        return path.as_posix()
    return Path(os.path.relpath(path, folder)).as_posix()


def _in_file(path: Path, value: str) -> str:
    """A path written in the file, relative to the file's folder."""
    return str(path.parent / Path(value).expanduser())


def _type_error(path: Path, key: str, expected: str, raw: Any) -> UsageError:
    return UsageError(f"{path}: '{key}' must be {expected}, got {raw!r}")


def _bool(raw: Any, path: Path, key: str) -> bool:
    if not isinstance(raw, bool):
        raise _type_error(path, key, "true or false", raw)
    return raw


def _int(raw: Any, path: Path, key: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise _type_error(path, key, "an integer", raw)
    return raw


def _str(raw: Any, path: Path, key: str) -> str:
    if not isinstance(raw, str) or not raw:
        raise _type_error(path, key, "a non-empty string", raw)
    return raw


def _file_path(raw: Any, path: Path, key: str) -> Path:
    return Path(_in_file(path, _str(raw, path, key)))


def _target(raw: Any, path: Path, key: str) -> str:
    text = _str(raw, path, key)
    return _in_file(path, text) if Path(text).suffix in SUFFIXES else text


def _plugins(raw: Any, path: Path, key: str) -> list[str]:
    if not isinstance(raw, list) or not all(isinstance(p, str) and p for p in raw):
        raise _type_error(path, key, "a list of strings", raw)
    return [_in_file(path, p) if p.endswith(".py") else p for p in raw]


def _dims(raw: Any, path: Path, key: str) -> dict[str, int]:
    if not isinstance(raw, dict):
        raise _type_error(path, key, "a table of name = size", raw)
    for name, size in raw.items():
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise _type_error(path, f"{key}.{name}", "a positive integer", size)
    return dict(raw)


def _tolerances(raw: Any, path: Path, key: str) -> dict[str, dict[str, float | None]]:
    if not isinstance(raw, dict):
        raise _type_error(path, key, "a table of kinds (exact, approximate, interface)", raw)
    result: dict[str, dict[str, float | None]] = {}
    for kind, overrides in raw.items():
        if kind not in KINDS:
            raise UsageError(
                f"{path}: unknown tolerance kind '{kind}'" + _suggest(kind, list(KINDS), "kinds")
            )
        if not isinstance(overrides, dict):
            raise _type_error(path, f"{key}.{kind}", "a table of name = number", overrides)
        known = [f.name for f in dataclasses.fields(Tolerance)]
        result[kind] = {}
        for name, value in overrides.items():
            if name not in known:
                raise UsageError(
                    f"{path}: unknown key '{key}.{kind}.{name}'" + _suggest(name, known, "keys")
                )
            if value is None or (isinstance(value, str) and value.lower() == "none"):
                result[kind][name] = None
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                result[kind][name] = float(value)
            else:
                raise _type_error(path, f"{key}.{kind}.{name}", 'a number or "none"', value)
    return result


_CHECKS = {
    "passes": passes_spec,
    "golden": _file_path,
    "target": _target,
    "verify": _bool,
    "keep_going": _bool,
    "report": _file_path,
    "external_data": _bool,
    "dims": _dims,
    "seed": _int,
    "plugins": _plugins,
    "tolerances": _tolerances,
}

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))
