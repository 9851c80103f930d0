"""Target profiles: which operators (domain, op type, version) a runtime can run.

A profile is a small JSON file (TOML on Python 3.11+) of one of three forms:

- ``{"standard_opset": 17}``: standard ONNX at that opset, nothing else;
- ``{"onnxruntime_provider": "CPUExecutionProvider"}``: the kernels the installed onnxruntime
  registers for that execution provider;
- ``{"opset": 13, "ops": {"": {"13": ["Add", ...]}, "com.microsoft": {"1": [...]}}}``: an explicit
  list of operators per domain and opset.

Every form also carries ``name``, ``description`` and ``source`` (where the op list comes from).
Built-in profiles live in ``profiles/``; ``load_target`` also takes a path to a user's file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from onnxopt.errors import UsageError

PROFILES = Path(__file__).with_name("profiles")
_ALIASES = {"ai.onnx": ""}
_FORMS = ("standard_opset", "onnxruntime_provider", "ops")


@dataclasses.dataclass(frozen=True)
class Target:
    """A runtime's operator support; ``supports(domain, op, opset)`` is the one question."""

    name: str
    description: str
    source: str
    opset: int
    """The standard opset models are converted to for this target."""
    _supports: Callable[[str, str, int], bool] = dataclasses.field(repr=False, compare=False)
    _opsets: Callable[[int], bool] = dataclasses.field(repr=False, compare=False)

    def accepts_opset(self, opset: int) -> bool:
        """Whether a model importing the standard domain at ``opset`` loads as it is."""
        return self._opsets(opset)

    def supports(self, domain: str, op_type: str, opset: int) -> bool:
        """Whether ``domain::op_type`` runs in a model importing ``domain`` at ``opset``."""
        domain = _ALIASES.get(domain, domain)
        if domain == "" and op_type == "Constant":
            return True  # runtimes turn Constant nodes into values when they load the model
        return self._supports(domain, op_type, opset)


def builtin_targets() -> list[str]:
    return sorted(p.stem for p in PROFILES.glob("*.json"))


def load_target(name_or_path: str | Path) -> Target:
    """A built-in profile by name, or a profile file (.json, or .toml on Python 3.11+)."""
    path = Path(name_or_path)
    if path.suffix not in (".json", ".toml"):
        path = PROFILES / f"{name_or_path}.json"
        if not path.is_file():
            known = ", ".join(builtin_targets())
            raise UsageError(f"unknown target '{name_or_path}' (built-in: {known}; or a file)")
    return _from_profile(_read(path), path)


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"target profile not found: {path}")
    try:
        if path.suffix == ".toml":
            import tomllib

            return tomllib.loads(path.read_text())
        return json.loads(path.read_text())
    except ImportError:
        raise UsageError("TOML target profiles need Python 3.11+; use JSON") from None
    except ValueError as err:
        raise UsageError(f"target profile {path} does not parse: {err}") from None


def _from_profile(profile: dict[str, Any], path: Path) -> Target:
    forms = [key for key in _FORMS if key in profile]
    if len(forms) != 1:
        raise UsageError(f"target profile {path} needs exactly one of {', '.join(_FORMS)}")
    common = {
        "name": str(profile.get("name", path.stem)),
        "description": str(profile.get("description", "")),
        "source": str(profile.get("source", "")),
    }
    try:
        if forms[0] == "standard_opset":
            opset = int(profile["standard_opset"])
            supports = functools.partial(_standard, opset)
            return Target(**common, opset=opset, _supports=supports, _opsets=opset.__ge__)
        if forms[0] == "onnxruntime_provider":
            kernels = _ort_kernels(str(profile["onnxruntime_provider"]))
            starts = [
                lo for (domain, _), ranges in kernels.items() if domain == "" for lo, _ in ranges
            ]
            opset = min(max(starts), onnx.defs.onnx_opset_version())
            supports = functools.partial(_in_ranges, kernels)
            return Target(**common, opset=opset, _supports=supports, _opsets=opset.__ge__)
        ops = {
            _ALIASES.get(domain, domain): {
                int(v): frozenset(names) for v, names in versions.items()
            }
            for domain, versions in profile["ops"].items()
        }
        opset = int(profile.get("opset", max(ops.get("", {0: None}))))
        supports = functools.partial(_listed, ops)
        return Target(
            **common, opset=opset, _supports=supports, _opsets=set(ops.get("", ())).__contains__
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UsageError(f"target profile {path} is malformed: {err!r}") from None


def _standard(target_opset: int, domain: str, op_type: str, opset: int) -> bool:
    if domain != "":
        return False
    return onnx.defs.has(op_type, min(opset, target_opset), "") and not _deprecated(op_type, opset)


def _deprecated(op_type: str, opset: int) -> bool:
    try:
        return onnx.defs.get_schema(op_type, opset, "").deprecated
    except onnx.defs.SchemaError:
        return False


@functools.cache
def _ort_kernels(provider: str) -> dict[tuple[str, str], list[tuple[int, int]]]:
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    kernels: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for kernel in ort_c.get_all_opkernel_def():
        if kernel.provider == provider:
            domain = _ALIASES.get(kernel.domain, kernel.domain)
            kernels.setdefault((domain, kernel.op_name), []).append(tuple(kernel.version_range))
    if not kernels:
        raise UsageError(f"the installed onnxruntime has no kernels for {provider}")
    return kernels


def _in_ranges(
    kernels: dict[tuple[str, str], list[tuple[int, int]]], domain: str, op_type: str, opset: int
) -> bool:
    version = schema_version(domain, op_type, opset)
    return any(lo <= version <= hi for lo, hi in kernels.get((domain, op_type), ()))


def _listed(
    ops: dict[str, dict[int, frozenset[str]]], domain: str, op_type: str, opset: int
) -> bool:
    return op_type in ops.get(domain, {}).get(opset, frozenset())


def schema_version(domain: str, op_type: str, opset: int) -> int:
    """The version of the op's schema in force at ``opset`` (``opset`` itself when unknown)."""
    try:
        return onnx.defs.get_schema(op_type, opset, domain).since_version
    except onnx.defs.SchemaError:
        return opset


def node_opset(model: ir.Model, node: ir.Node) -> int:
    """The opset a node's domain is imported at (1 when the model does not say)."""
    domain = _ALIASES.get(node.domain, node.domain)
    return model.opset_imports.get(domain, model.opset_imports.get(node.domain, 1))
