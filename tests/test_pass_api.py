"""The pass contract and the registry."""

from __future__ import annotations

from typing import Literal

import pytest

from onnxopt import Pass, PassResult, UsageError, register_alias, register_pass, registry, spec


class _Choice(Pass):
    """Takes a choice of algorithm."""

    name = "test-choice"
    algo: Literal["rtn", "kquant"] = "rtn"
    limit: int | None = None

    def call(self, model):
        return PassResult(model, False)


def test_options_are_dataclass_fields_with_defaults() -> None:
    assert [f.name for f in _Choice.options()] == ["algo", "limit"]
    assert _Choice().algo == "rtn"
    assert _Choice.summary() == "Takes a choice of algorithm."


def test_literal_and_optional_options() -> None:
    assert _Choice.from_options({"algo": "kquant", "limit": "none"}).limit is None
    assert _Choice.from_options({"limit": "7"}).limit == 7
    with pytest.raises(UsageError, match="did you mean 'kquant'"):
        _Choice.from_options({"algo": "kqant"})


def test_to_spec_leaves_defaults_out() -> None:
    assert _Choice().to_spec() == "test-choice"
    assert _Choice(algo="kquant", limit=3).to_spec() == "test-choice(algo=kquant,limit=3)"


def test_bad_kind_is_rejected_at_class_creation() -> None:
    with pytest.raises(TypeError, match="kind"):

        class _Bad(Pass):
            name = "test-bad"
            kind = "fuzzy"  # type: ignore[assignment]


def test_register_rejects_bad_and_duplicate_names() -> None:
    class _Snake(Pass):
        name = "snake_case"

    with pytest.raises(ValueError, match="kebab-case"):
        register_pass(_Snake)

    class _Clash(Pass):
        name = "cleanup"

    with pytest.raises(ValueError, match="already registered"):
        register_pass(_Clash)
    assert registry.get_pass("cleanup") is not _Clash


def test_user_pass_and_alias_usable_by_name() -> None:
    @register_pass
    class _Mine(Pass):
        name = "test-mine"

        def call(self, model):
            return PassResult(model, False)

    register_alias("test-mine-twice", "test-mine,test-mine")
    assert [type(p) for p in spec.build("test-mine-twice")] == [_Mine, _Mine]
    with pytest.raises(ValueError):
        register_alias("cleanup", "fold-constants")


def test_builtin_passes_load_lazily_by_name() -> None:
    assert {"fold-constants", "cleanup", "infer-shapes"} <= set(registry.pass_names())
    for name in ("fold-constants", "cleanup", "infer-shapes"):
        cls = registry.get_pass(name)
        assert cls is not None and cls.name == name and cls.kind == "exact"
    assert registry.get_pass("no-such-pass") is None
