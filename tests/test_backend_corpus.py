"""The ONNX backend test cases as an external corpus: our passes must keep their outputs.

Cases are the node tests (which onnx builds in memory: its wheel no longer ships
``data/node``) and the model tests under ``onnx/backend/test/data`` (``simple``,
``pytorch-converted``, ``pytorch-operator``; ``real`` and ``light`` need downloads or a
reference run). Each case runs in ONNX Runtime as it is, then after
``fold-constants,cleanup,infer-shapes``; both runs must match the case's expected outputs
with the tolerance of onnx's backend runner. Cases that ORT cannot run as they are appear in
``backend_expected_skips.json``, which ``python tests/tools/make_backend_skips.py`` rewrites.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.backend.test
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from onnx.backend.test.loader import load_model_tests

import onnxopt

PIPELINE = "simplify"  # infer-shapes,fold-constants,fold-batchnorm,cleanup,infer-shapes
MODEL_KINDS = ("simple", "pytorch-converted", "pytorch-operator")
SKIPS_PATH = Path(__file__).with_name("backend_expected_skips.json")
DATA_DIR = Path(onnx.backend.test.__file__).parent / "data"

# Cases ORT runs correctly that our passes break: real bugs, kept visible as strict xfails until
# src/ is fixed (a fixed case then XPASSes, which fails the run: delete it here). {case id: why}
KNOWN_ONNXOPT_FAILURES: dict[str, str] = {}

# 8- and 16-bit types without a numpy dtype of their own, passed to and from ORT as raw bytes.
_BRIDGED = {
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.FLOAT8E4M3FN,
    onnx.TensorProto.FLOAT8E4M3FNUZ,
    onnx.TensorProto.FLOAT8E5M2,
    onnx.TensorProto.FLOAT8E5M2FNUZ,
    onnx.TensorProto.FLOAT8E8M0,
}

# "/onnxruntime_src/<file>:<line> <C++ signature> " in ORT's errors, before the useful part.
_ORT_SOURCE = re.compile(
    r"/onnxruntime_src/\S+:\d+ (?:[\w:<>*&]+ ){0,2}[\w:<>~]+\([^)]*\)"
    r"(?:::<lambda\(\)>)?(?: const)?(?: \[[^\]]*\])? "
)

# An input or expected output: a tensor, a sequence of values, or an empty optional.
Value = Any
DataSet = tuple[list[Value], list[Value]]


class OrtFailure(Exception):
    """ORT could not run a model, or its outputs differ from the expected ones."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One backend test case: a model and its data sets, from memory (node) or a folder."""

    kind: str
    name: str
    rtol: float
    atol: float
    proto: onnx.ModelProto | None = None
    node_data: list[DataSet] | None = None
    folder: Path | None = None

    @property
    def id(self) -> str:
        return f"{self.kind}/{self.name}"

    def model_proto(self) -> onnx.ModelProto:
        if self.proto is not None:
            return self.proto
        assert self.folder is not None
        return onnx.load(self.folder / "model.onnx")

    def model(self) -> ir.Model:
        """The model as onnxopt sees it (loaded with ``onnxopt.load`` where it is a file)."""
        if self.folder is not None:
            return onnxopt.load(self.folder / "model.onnx")
        return ir.from_proto(self.model_proto())

    def data_sets(self, proto: onnx.ModelProto) -> list[DataSet]:
        if self.node_data is not None:
            return [
                ([_normalize(v) for v in i], [_normalize(v) for v in o]) for i, o in self.node_data
            ]
        assert self.folder is not None
        inputs = _runtime_inputs(proto)
        outputs = list(proto.graph.output)
        sets = []
        for folder in sorted(self.folder.glob("test_data_set_*")):
            ins = sorted(folder.glob("input_*.pb"), key=_index)
            outs = sorted(folder.glob("output_*.pb"), key=_index)
            sets.append(
                (
                    [_read_value(p, inputs[_index(p)].type) for p in ins],
                    [_read_value(p, outputs[_index(p)].type) for p in outs],
                )
            )
        return sets


def iter_cases() -> Iterator[Case]:
    """Every corpus case, node cases first, in a stable order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generators overflow on purpose (Cast, Reduce*)
        node_cases = load_model_tests(kind="node")
    for case in sorted(node_cases, key=lambda c: c.name):
        yield Case("node", case.name, case.rtol, case.atol, case.model, list(case.data_sets))
    for kind in MODEL_KINDS:
        for case in sorted(load_model_tests(str(DATA_DIR), kind=kind), key=lambda c: c.name):
            if case.model_dir is not None:
                yield Case(kind, case.name, case.rtol, case.atol, folder=Path(case.model_dir))


def run_ort(model_bytes: bytes, proto: onnx.ModelProto, case: Case) -> None:
    """Run a serialized model on every data set of ``case``; raise OrtFailure on any mismatch."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise OrtFailure(_first_line(err)) from None
    inputs = _runtime_inputs(proto)
    output_types = [_elem_type(o.type) for o in proto.graph.output]
    bridged = any(t in _BRIDGED for t in output_types)
    for values, expected in case.data_sets(proto):
        feeds = {
            i.name: _to_ort(v, _elem_type(i.type), bridged)
            for i, v in zip(inputs, values, strict=False)
        }
        try:
            if bridged:
                results = session.run_with_ort_values(None, feeds)
                outputs = [_from_ort(r, t) for r, t in zip(results, output_types, strict=True)]
            else:
                outputs = session.run(None, feeds)
        except Exception as err:
            raise OrtFailure(_first_line(err)) from None
        try:
            assert_similar(expected, outputs, case.rtol, case.atol)
        except AssertionError as err:
            raise OrtFailure(f"ORT output differs from expected: {err}") from None


def assert_similar(
    expected: Value, actual: Value, rtol: float, atol: float, where: str = ""
) -> None:
    """``Runner.assert_similar_outputs`` of onnx, extended to empty optionals; short messages."""
    if isinstance(expected, (list, tuple)):
        if not isinstance(actual, (list, tuple)):
            raise AssertionError(f"{where or 'value'}: {type(actual).__name__}, expected a list")
        if len(actual) != len(expected):
            raise AssertionError(
                f"{where or 'value'}: {len(actual)} items, expected {len(expected)}"
            )
        for i, (exp, act) in enumerate(zip(expected, actual, strict=True)):
            assert_similar(exp, act, rtol, atol, f"{where}[{i}]" if where else f"output {i}")
        return
    if expected is None:
        if actual is not None:
            raise AssertionError(f"{where}: {type(actual).__name__}, expected an empty optional")
        return
    expected, actual = np.asarray(expected), np.asarray(actual)
    if actual.shape != expected.shape:
        raise AssertionError(f"{where}: shape {actual.shape}, expected {expected.shape}")
    if expected.dtype == object:  # strings
        if not np.array_equal(actual, expected):
            raise AssertionError(f"{where}: strings differ")
        return
    if actual.dtype != expected.dtype:
        raise AssertionError(f"{where}: dtype {actual.dtype}, expected {expected.dtype}")
    if expected.dtype.name == "bfloat16":
        rtol = max(rtol, 2**-6)  # two bfloat16 ulps, as onnx's runner allows
    if not _numpy_native(expected.dtype):  # bfloat16, float8, ...: compare as float32
        expected, actual = expected.astype(np.float32), actual.astype(np.float32)
    try:
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)
    except AssertionError:
        diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
        worst = float(np.nanmax(diff)) if not np.isnan(diff).all() else float("nan")
        raise AssertionError(f"{where}: max abs {worst:.3g}") from None


def load_expected_skips() -> dict[str, str]:
    return json.loads(SKIPS_PATH.read_text()) if SKIPS_PATH.exists() else {}


def _normalize(value: Value) -> Value:
    """A data-set value as ORT takes it: TensorProto and numpy scalars become arrays."""
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, (list, tuple)):
        return [_normalize(v) for v in value]
    if value is None:
        return None
    return np.asarray(value)


def _read_value(path: Path, type_proto: onnx.TypeProto) -> Value:
    data = path.read_bytes()
    if type_proto.HasField("sequence_type"):
        return numpy_helper.to_list(onnx.SequenceProto.FromString(data))
    if type_proto.HasField("optional_type"):
        return numpy_helper.to_optional(onnx.OptionalProto.FromString(data))
    return numpy_helper.to_array(onnx.TensorProto.FromString(data))


def _runtime_inputs(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not initializers: those a data set feeds, in order."""
    initializers = {t.name for t in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in initializers]


def _signature(model: ir.Model) -> tuple[list[str | None], list[str | None]]:
    """The names a caller feeds and fetches."""
    inputs = [v.name for v in model.graph.inputs if not v.is_initializer()]
    return inputs, [v.name for v in model.graph.outputs]


def _merged_outputs(model: ir.Model) -> list[str]:
    """Graphs (subgraphs included) that list one value as two of their outputs."""
    return [
        graph.name or "main"
        for graph in model.graphs()
        if len({id(v) for v in graph.outputs}) < len(graph.outputs)
    ]


def _index(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[1])


def _numpy_native(dtype: np.dtype) -> bool:
    return type(dtype).__module__.startswith("numpy") and dtype.name != "bfloat16"


def _elem_type(type_proto: onnx.TypeProto) -> int:
    return type_proto.tensor_type.elem_type if type_proto.HasField("tensor_type") else 0


def _to_ort(value: Value, elem_type: int, as_ort_value: bool) -> Value:
    """A feed; ORT's numpy binding refuses ml_dtypes, so those go in as typed raw bytes."""
    if elem_type in _BRIDGED and isinstance(value, np.ndarray):
        raw = value.view(f"uint{8 * value.dtype.itemsize}")
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(raw, elem_type)
    if as_ort_value and isinstance(value, np.ndarray):
        return ort.OrtValue.ortvalue_from_numpy(value)
    return value


def _from_ort(value: ort.OrtValue, elem_type: int) -> np.ndarray:
    """An output tensor; types numpy lacks are copied out as bytes and viewed as the ml_dtype."""
    if elem_type not in _BRIDGED:
        return value.numpy()
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    size = value.tensor_size_in_bytes()
    raw = bytes((ctypes.c_uint8 * size).from_address(value.data_ptr())) if size else b""
    return np.frombuffer(raw, dtype=dtype).reshape(value.shape())


def _first_line(err: BaseException) -> str:
    """A short, stable reason: the first non-empty line, ORT's status prefix removed."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    if text.startswith("[ONNXRuntimeError]"):
        text = text.split(" : ", 2)[-1]
    return _ORT_SOURCE.sub("", text)[:200]


CASES = list(iter_cases())
EXPECTED_SKIPS = load_expected_skips()


def _param(case: Case) -> Any:
    marks = []
    if case.id in KNOWN_ONNXOPT_FAILURES:
        marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_ONNXOPT_FAILURES[case.id]))
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_backend_case(case: Case) -> None:
    """ORT matches the expected outputs before and after the pipeline, and the pipeline holds."""
    original = case.model_proto()
    try:
        run_ort(original.SerializeToString(), original, case)
    except OrtFailure as err:
        if case.id in EXPECTED_SKIPS:
            pytest.skip(EXPECTED_SKIPS[case.id])
        pytest.fail(
            f"ORT fails on the original model but {case.id} is not an expected skip ({err}); "
            "regenerate tests/backend_expected_skips.json with tests/tools/make_backend_skips.py"
        )

    model = case.model()
    signature, merged = _signature(model), _merged_outputs(model)
    model, report = onnxopt.Pipeline(PIPELINE, verify=False).run(model)
    assert report.ok, "; ".join(f"{p.name} {p.status}: {p.reason}" for p in report.failed)
    assert _signature(model) == signature, (
        f"graph inputs/outputs changed: {signature} -> {_signature(model)}"
    )
    assert _merged_outputs(model) == merged, (
        f"graphs list one value as two outputs: {_merged_outputs(model)}"
    )
    rewritten = ir.to_proto(model)
    try:
        run_ort(rewritten.SerializeToString(), rewritten, case)
    except OrtFailure as err:
        pytest.fail(f"after {PIPELINE}: {err}")


def test_listed_cases_exist() -> None:
    """Expected skips and known failures name cases of the corpus (stale names: regenerate)."""
    stale = sorted((set(EXPECTED_SKIPS) | set(KNOWN_ONNXOPT_FAILURES)) - {c.id for c in CASES})
    assert not stale, f"unknown cases: {stale[:10]}"


def test_known_failures_are_not_skips() -> None:
    """A known onnxopt failure is a case ORT runs, so it cannot also be an expected skip."""
    assert not set(KNOWN_ONNXOPT_FAILURES) & set(EXPECTED_SKIPS)
