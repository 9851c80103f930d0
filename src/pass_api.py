"""The pass contract: a named onnx-ir pass with typed options, a kind and counted rewrites."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

import numpy as np
import onnx_ir as ir

from onnxopt import ort_runner
from onnxopt.errors import UsageError

Kind = Literal["exact", "approximate", "interface"]
KINDS: tuple[str, ...] = get_args(Kind)


@dataclasses.dataclass
class PassResult(ir.passes.PassResult):
    """What a pass did: ``modified``, how often each rule fired, notes, and near misses.

    ``misses`` says why rules that almost matched did not fire (shown with ``--explain``).
    ``layers`` has one dict per weight a weight pass changed (keys: ``PassReport.layers``).
    """

    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    misses: list[str] = dataclasses.field(default_factory=list)
    layers: list[dict[str, Any]] = dataclasses.field(default_factory=list)


class Pass(ir.passes.InPlacePass):
    """Base class of every onnxopt pass.

    A subclass sets ``name`` (kebab-case) and ``kind``, declares options as annotated class
    attributes with defaults (it becomes a dataclass automatically), may validate them in
    ``__post_init__`` by raising ``ValueError``, and implements ``call(model) -> PassResult``.
    The first line of its docstring is its one-line summary.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[Kind] = "exact"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__dataclass_fields__" not in cls.__dict__:
            dataclasses.dataclass(cls)
        if cls.kind not in KINDS:
            raise TypeError(f"{cls.__name__}.kind must be one of {KINDS}, not {cls.kind!r}")

    def call(self, model: ir.Model) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def run_golden(
        self, model: ir.Model, cases: list[dict[str, np.ndarray]]
    ) -> list[dict[str, np.ndarray]]:
        """Outputs comparable with the golden ones; ``interface`` passes override this."""
        return ort_runner.run(model, cases)

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    @classmethod
    def options(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))  # type: ignore[arg-type]

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> Pass:
        """Build the pass from option values; strings from a spec become the field's type."""
        hints = typing.get_type_hints(cls)
        known = [f.name for f in cls.options()]
        values = {}
        for key, raw in options.items():
            if key not in known:
                raise UsageError(
                    f"pass '{cls.name}' has no option '{key}'" + _suggest(key, known, "options")
                )
            values[key] = convert(raw, hints[key], f"{cls.name}({key}=...)")
        try:
            return cls(**values)
        except (ValueError, TypeError) as err:
            raise UsageError(f"pass '{cls.name}': {err}") from None

    def to_spec(self) -> str:
        """The pipeline item that rebuilds this pass: ``name(key=value,...)``, defaults left out."""
        items = []
        for field in self.options():
            value = getattr(self, field.name)
            if field.default is not dataclasses.MISSING and value == field.default:
                continue
            if (
                field.default_factory is not dataclasses.MISSING
                and value == field.default_factory()
            ):
                continue
            items.append(f"{field.name}={format_value(value)}")
        return f"{self.name}({','.join(items)})" if items else self.name

    def __str__(self) -> str:
        return self.to_spec()


def convert(raw: Any, hint: Any, where: str) -> Any:
    """Convert a spec value (a string, or a list of strings) to the type ``hint``."""
    if not isinstance(raw, (str, list)):
        return raw  # a Python caller passed a real value
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if isinstance(raw, str) and raw.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return convert(raw, arg, where)
            except UsageError as err:
                errors.append(str(err))
        raise UsageError(errors[0] if errors else f"{where}: bad value {raw!r}")
    if origin is Literal:
        if raw not in args:
            raise UsageError(
                f"{where}: {raw!r} is not one of {', '.join(map(str, args))}"
                + _suggest(str(raw), [str(a) for a in args], "values")
            )
        return raw
    if origin in (list, tuple):
        items = raw if isinstance(raw, list) else [raw]
        item_type = args[0] if args else str
        return origin(convert(item, item_type, where) for item in items)
    if isinstance(raw, list):
        raise UsageError(f"{where}: expected one value, got a list")
    if hint is bool:
        lowered = raw.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise UsageError(f"{where}: expected true or false, got {raw!r}")
    if hint in (int, float):
        try:
            return hint(raw)
        except ValueError:
            raise UsageError(f"{where}: expected {hint.__name__}, got {raw!r}") from None
    return raw


def format_value(value: Any) -> str:
    """A value as the spec writes it, so that parsing it back gives the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    text = str(value)
    if any(c in text for c in ",()[]=' \"") or text == "":
        return "'" + text.replace("'", "\\'") + "'"
    return text


def option_default(field: dataclasses.Field) -> Any:
    """An option's default value (built when it has a factory); MISSING when it has none."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _suggest(word: str, choices: list[str], what: str) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; known {what}: {', '.join(choices)}" if choices else f"; it takes no {what}"
