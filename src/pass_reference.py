"""The pass reference (Markdown), generated from the registry: every pass and alias, with options.

The docs site's hook puts :func:`markdown` into ``docs/reference/passes.md`` at build time.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from typing import Any, Literal, Union

from onnxopt import registry
from onnxopt.pass_api import Pass, format_value, option_default

_ITEM = re.compile(r"^(\s*)(\d+\.|[-*]) ")


def markdown() -> str:
    """The reference: an index of the passes, the aliases, then one section per pass."""
    names = registry.pass_names()
    classes = {name: registry.get_pass(name) for name in names}
    lines = ["| pass | kind | summary |", "| --- | --- | --- |"]
    lines += [f"| [`{n}`](#{n}) | {c.kind} | {_cell(c.summary())} |" for n, c in classes.items()]
    lines += ["", "## Aliases", "", "| alias | expands to |", "| --- | --- |"]
    for alias, spec in registry.aliases().items():
        lines.append(f"| `{alias}` | {_linked_spec(spec, set(names))} |")
    lines += ["", "## Passes", ""]
    for name, cls in classes.items():
        lines += _pass_section(name, cls)
    return "\n".join(lines) + "\n"


def _pass_section(name: str, cls: type[Pass]) -> list[str]:
    lines = [f"### `{name}`", "", f"*{cls.kind}*: {cls.summary()}", ""]
    body = _doc_markdown(cls.__doc__ or "")
    if body:
        lines += [body, ""]
    rows = option_rows(cls)
    if rows:
        lines += ["| option | type | default | allowed values |", "| --- | --- | --- | --- |"]
        lines += ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows]
    else:
        lines.append("No options.")
    return [*lines, ""]


def option_rows(cls: type[Pass]) -> list[tuple[str, str, str, str]]:
    """One ``(name, type, default, allowed values)`` per option, each as Markdown text."""
    hints = typing.get_type_hints(cls)
    rows = []
    for field in cls.options():
        hint = hints[field.name]
        rows.append(
            (
                f"`{field.name}`",
                f"`{type_text(hint)}`",
                _default(field),
                _allowed(field.name, hint),
            )
        )
    return rows


def type_text(hint: Any) -> str:
    """A type hint as a user reads it: ``int | None``, ``list[str]``; a ``Literal`` as its type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return " | ".join(dict.fromkeys(type(a).__name__ for a in args))
    if origin in (Union, types.UnionType):
        return " | ".join(type_text(a) for a in args)
    if origin is not None and args:
        return f"{origin.__name__}[{', '.join(type_text(a) for a in args)}]"
    if hint is type(None):
        return "None"
    return getattr(hint, "__name__", str(hint))


def _default(field: dataclasses.Field) -> str:
    value = option_default(field)
    if value is dataclasses.MISSING:
        return "required"
    return "`none`" if value is None else f"`{format_value(value)}`"


def _allowed(name: str, hint: Any) -> str:
    """Allowed values where the type says them (``Literal``, ``bool``) and for targets."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        return ", ".join(f"`{format_value(a)}`" for a in args)
    if hint is bool:
        return "`true`, `false`"
    if name == "target":
        from onnxopt.targets import builtin_targets

        names = ", ".join(f"`{t}`" for t in builtin_targets())
        return f"{names}, or a profile file ([targets](../targets.md))"
    if type(None) in args:
        rest = " | ".join(type_text(a) for a in args if a is not type(None))
        return f"`none`, or any `{rest}`"
    return ""


def _linked_spec(spec: str, passes: set[str]) -> str:
    """A pipeline spec with each pass name linked to its section."""
    items = [item.strip() for item in spec.split(",")]
    return ", ".join(f"[`{i}`](#{i})" if i in passes else f"`{i}`" for i in items)


def _doc_markdown(doc: str) -> str:
    """A pass docstring after its summary line as Markdown: lists get the blank lines they need."""
    text = inspect.cleandoc(doc)
    lines = text.splitlines()[1:]
    out: list[str] = []
    list_indent: int | None = None
    for line in lines:
        indent = len(line) - len(line.lstrip())
        item = _ITEM.match(line)
        if item and list_indent is None:
            list_indent = indent
            out.append("")
        elif list_indent is not None and not item and (not line.strip() or indent <= list_indent):
            list_indent = None
            out.append("")
        out.append(line.strip())
    return "\n".join(out).strip()


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")
