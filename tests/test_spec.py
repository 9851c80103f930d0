"""The pipeline spec parser: grammar, round trips, aliases, and errors that point at a column."""

from __future__ import annotations

import pytest

from onnxopt import Pass, PassResult, registry, spec
from onnxopt.spec import SpecError


@registry.register_pass
class _OptionsPass(Pass):
    """A pass with one option of each kind, for parser tests."""

    name = "test-options"
    block: int = 32
    ratio: float = 0.5
    symmetric: bool = True
    algo: str = "rtn"
    exclude: list[str] = ()  # type: ignore[assignment]

    def call(self, model):
        return PassResult(model, False)


def test_parse_items_options_and_lists() -> None:
    items = spec.parse(" a , b( k=1, s='x,y', l=[p, 'q r'] ),c()")
    assert [i.name for i in items] == ["a", "b", "c"]
    assert items[1].options == {"k": "1", "s": "x,y", "l": ["p", "q r"]}
    assert items[1].column == 6


def test_build_converts_option_types() -> None:
    (p,) = spec.build("test-options(block=64,ratio=0.25,symmetric=false,exclude=[a,b])")
    assert (p.block, p.ratio, p.symmetric, p.exclude) == (64, 0.25, False, ["a", "b"])


@pytest.mark.parametrize(
    "text",
    [
        "test-options",
        "test-options(block=16)",
        "test-options(algo='a,b',exclude=[x,'y z'])",
        "fold-constants(max_output_elements=10),cleanup,infer-shapes(data_prop=false)",
    ],
)
def test_spec_round_trips(text: str) -> None:
    passes = spec.build(text)
    assert spec.to_spec(passes) == text
    assert spec.build(spec.to_spec(passes)) == passes


def test_alias_expands_in_place() -> None:
    names = [p.name for p in spec.build("cleanup,simplify")]
    assert names == [
        "cleanup",
        "infer-shapes",
        "fold-constants",
        "fold-batchnorm",
        "cleanup",
        "infer-shapes",
    ]


@pytest.mark.parametrize(
    ("text", "column", "fragment"),
    [
        ("fold-constant", 1, "did you mean 'fold-constants'"),
        ("cleanup,infer-shape", 9, "did you mean 'infer-shapes'"),
        ("test-options(blok=3)", 14, "did you mean 'block'"),
        ("test-options(block=x)", 14, "expected int"),
        ("test-options(symmetric=maybe)", 14, "true or false"),
        ("test-options(block=3", 21, "expected ')'"),
        ("test-options(block=3,block=4)", 22, "given twice"),
        ("cleanup,,fold-constants", 9, "expected a pass name"),
        ("simplify(x=1)", 10, "no pass in alias 'simplify' has an option 'x'"),
        ("test-options(algo='abc", 19, "unterminated"),
        ("", 1, "empty pipeline"),
    ],
)
def test_errors_name_the_column(text: str, column: int, fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        spec.build(text)
    assert info.value.column == column
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_alias_options_reach_every_pass_that_has_them() -> None:
    registry.register_alias("test-alias-options", "fold-constants,cleanup,fold-constants")
    passes = spec.build("test-alias-options(max_output_elements=7)")
    assert [p.name for p in passes] == ["fold-constants", "cleanup", "fold-constants"]
    assert passes[0].max_output_elements == passes[2].max_output_elements == 7
    assert passes[1] == spec.build("cleanup")[0]


def test_validation_in_post_init_is_a_usage_error() -> None:
    with pytest.raises(SpecError, match="size caps must be >= 0"):
        spec.build("fold-constants(max_output_elements=-1)")
