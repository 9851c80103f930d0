"""Pipeline specs: ``fold-constants,quant-int4(block=32,algo=kquant)`` parsed into passes.

Grammar::

    pipeline := item ("," item)*
    item     := NAME ["(" [option ("," option)*] ")"]
    option   := KEY "=" value
    value    := 'quoted' | "quoted" | "[" [atom ("," atom)*] "]" | atom

Errors name the column (1-based) and suggest the nearest pass or option.
"""

from __future__ import annotations

import dataclasses
import difflib
import re

from onnxopt import registry
from onnxopt.errors import UsageError
from onnxopt.pass_api import Pass

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_ATOM = re.compile(r"[^,()\[\]=\s'\"]+")


class SpecError(UsageError):
    """A pipeline spec that does not parse or names something unknown."""

    def __init__(self, message: str, spec: str, column: int) -> None:
        super().__init__(f"pipeline {spec!r}, column {column}: {message}")
        self.column = column


@dataclasses.dataclass
class Item:
    """One parsed pipeline item, before its pass is looked up."""

    name: str
    options: dict[str, str | list[str]]
    column: int
    option_columns: dict[str, int] = dataclasses.field(default_factory=dict)


def parse(spec: str) -> list[Item]:
    """Parse a spec into items; no registry lookups."""
    return _Parser(spec).pipeline()


def build(
    spec: str, _seen: tuple[str, ...] = (), inherited: dict[str, str | list[str]] | None = None
) -> list[Pass]:
    """Parse ``spec``, expand aliases, and instantiate each pass with its options.

    Options given to an alias (``fuse(target=onnx-17)``) go to every pass it expands to that
    has that option; an option none of them has is an error. ``inherited`` options apply the
    same way to every pass in ``spec`` that has them, below the pass's own options.
    """
    passes: list[Pass] = []
    aliases = registry.aliases()
    for item in parse(spec):
        if item.name in aliases:
            if item.name in _seen:
                raise SpecError(f"alias '{item.name}' expands to itself", spec, item.column)
            inherited = {**(inherited or {}), **item.options}
            expanded = build(aliases[item.name], (*_seen, item.name), inherited)
            taken = {f.name for p in expanded for f in p.options()}
            for key in item.options:
                if key not in taken:
                    column = item.option_columns.get(key, item.column)
                    message = f"no pass in alias '{item.name}' has an option '{key}'"
                    raise SpecError(message, spec, column)
            passes.extend(expanded)
            continue
        pass_cls = registry.get_pass(item.name)
        if pass_cls is None:
            known = registry.pass_names() + list(aliases)
            close = difflib.get_close_matches(item.name, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else "; see 'onnxopt passes'"
            raise SpecError(f"unknown pass '{item.name}'{hint}", spec, item.column)
        fields = {f.name for f in pass_cls.options()}
        options = {k: v for k, v in (inherited or {}).items() if k in fields}
        options.update(item.options)
        try:
            passes.append(pass_cls.from_options(options))
        except UsageError as err:
            column = _error_column(item, str(err))
            raise SpecError(str(err), spec, column) from None
    return passes


def to_spec(passes: list[Pass]) -> str:
    """The spec that rebuilds ``passes``; ``build(to_spec(p))`` gives equal passes."""
    return ",".join(p.to_spec() for p in passes)


def _error_column(item: Item, message: str) -> int:
    for key, column in item.option_columns.items():
        if f"({key}=" in message or f"option '{key}'" in message:
            return column
    return item.column


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, message: str, pos: int | None = None) -> SpecError:
        return SpecError(message, self.text, (self.pos if pos is None else pos) + 1)

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            found = repr(self.peek()) if self.peek() else "end of input"
            raise self.fail(f"expected '{char}', found {found}")
        self.pos += 1

    def word(self, pattern: re.Pattern[str], what: str) -> tuple[str, int]:
        self.skip_space()
        match = pattern.match(self.text, self.pos)
        if not match:
            found = repr(self.peek()) if self.peek() else "end of input"
            raise self.fail(f"expected {what}, found {found}")
        self.pos = match.end()
        return match.group(), match.start()

    def pipeline(self) -> list[Item]:
        if not self.text.strip():
            raise self.fail("empty pipeline", 0)
        items = [self.item()]
        while self.peek() == ",":
            self.pos += 1
            items.append(self.item())
        if self.peek():
            raise self.fail(f"unexpected {self.peek()!r}")
        return items

    def item(self) -> Item:
        name, start = self.word(_NAME, "a pass name")
        item = Item(name=name, options={}, column=start + 1)
        if self.peek() != "(":
            return item
        self.pos += 1
        if self.peek() == ")":
            self.pos += 1
            return item
        while True:
            key, key_start = self.word(_NAME, "an option name")
            if key in item.options:
                raise self.fail(f"option '{key}' given twice", key_start)
            self.expect("=")
            item.options[key] = self.value()
            item.option_columns[key] = key_start + 1
            if self.peek() == ",":
                self.pos += 1
                continue
            self.expect(")")
            return item

    def value(self) -> str | list[str]:
        char = self.peek()
        if char in ("'", '"'):
            return self.quoted(char)
        if char == "[":
            self.pos += 1
            values: list[str] = []
            if self.peek() == "]":
                self.pos += 1
                return values
            while True:
                quote = self.peek()
                values.append(self.quoted(quote) if quote in ("'", '"') else self.atom())
                if self.peek() == ",":
                    self.pos += 1
                    continue
                self.expect("]")
                return values
        return self.atom()

    def atom(self) -> str:
        return self.word(_ATOM, "a value")[0]

    def quoted(self, quote: str) -> str:
        start = self.pos
        self.pos += 1
        chars = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char == "\\" and self.pos + 1 < len(self.text):
                chars.append(self.text[self.pos + 1])
                self.pos += 2
                continue
            self.pos += 1
            if char == quote:
                return "".join(chars)
            chars.append(char)
        raise self.fail("unterminated string", start)
