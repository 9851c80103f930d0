"""Golden sets: inputs and the original model's outputs, captured once and checked after every pass.

On disk a golden set is a folder with ``inputs.npz``, ``outputs.npz`` (keys ``<case>/<name>``)
and ``golden.json`` (seed, the dims chosen for symbolic axes, tolerance overrides).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt import ort_runner
from onnxopt.errors import UnsupportedModelError, UsageError
from onnxopt.metrics import DEFAULT_TOLERANCES, Tolerance

_CASE_KEY = re.compile(r"^(\d+)/(.+)$")


@dataclasses.dataclass
class GoldenSet:
    """Inputs (one dict per case) and the outputs the original model gave for them."""

    inputs: list[dict[str, np.ndarray]]
    outputs: list[dict[str, np.ndarray]]
    seed: int | None = None
    dims: list[dict[str, int]] = dataclasses.field(default_factory=list)
    tolerances: dict[str, dict[str, float | None]] = dataclasses.field(default_factory=dict)
    source: str = "random"

    def tolerance(self, kind: str, overrides: dict[str, float | None] | None = None) -> Tolerance:
        """A pass kind's tolerance: defaults, then this set's overrides, then ``overrides``."""
        tol = DEFAULT_TOLERANCES[kind]
        tol = tol.replace(**self.tolerances.get(kind, {}))
        return tol.replace(**(overrides or {}))

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "inputs.npz", **_flatten(self.inputs))
        np.savez(folder / "outputs.npz", **_flatten(self.outputs))
        meta = {
            "version": 1,
            "source": self.source,
            "seed": self.seed,
            "cases": [
                {
                    "dims": self.dims[i] if i < len(self.dims) else {},
                    "inputs": {k: list(v.shape) for k, v in case.items()},
                }
                for i, case in enumerate(self.inputs)
            ],
            "tolerances": self.tolerances,
        }
        (folder / "golden.json").write_text(json.dumps(meta, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> GoldenSet:
        folder = Path(folder)
        if not folder.is_dir():
            raise UsageError(f"golden set folder not found: {folder}")
        for name in ("inputs.npz", "outputs.npz"):
            if not (folder / name).is_file():
                raise UsageError(f"golden set {folder} has no {name}")
        meta: dict[str, Any] = {}
        if (folder / "golden.json").is_file():
            try:
                meta = json.loads((folder / "golden.json").read_text())
            except json.JSONDecodeError as err:
                raise UsageError(f"{folder / 'golden.json'} is not valid JSON: {err}") from None
        cases = meta.get("cases", [])
        return cls(
            inputs=load_npz(folder / "inputs.npz"),
            outputs=load_npz(folder / "outputs.npz"),
            seed=meta.get("seed"),
            dims=[c.get("dims", {}) for c in cases],
            tolerances=meta.get("tolerances", {}),
            source=meta.get("source", "user"),
        )


def load_npz(path: str | Path) -> list[dict[str, np.ndarray]]:
    """Read cases from an npz: keys ``<case>/<name>``, or plain input names for one case."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {path}: {err}") from None
    cases: dict[int, dict[str, np.ndarray]] = {}
    for key, array in arrays.items():
        match = _CASE_KEY.match(key)
        index, name = (int(match.group(1)), match.group(2)) if match else (0, key)
        cases.setdefault(index, {})[name] = array
    return [cases[i] for i in sorted(cases)]


def capture(
    model: ir.Model,
    *,
    inputs: list[dict[str, np.ndarray]] | None = None,
    dims: dict[str, int] | None = None,
    seed: int = 0,
    shapes: int = 2,
) -> GoldenSet:
    """Run the original model on the given or synthesized inputs and keep its outputs."""
    if inputs is None:
        cases, chosen = synthesize(model, dims=dims, seed=seed, shapes=shapes)
        source = "random"
    else:
        check_inputs(model, inputs)
        cases, chosen, source = inputs, [], "user"
    try:
        outputs = ort_runner.run(model, cases)
    except Exception as err:
        hint = "" if inputs else " (give --dim name=value for symbolic dims, or --inputs)"
        raise UnsupportedModelError(f"cannot capture golden outputs: {err}{hint}") from None
    return GoldenSet(
        inputs=cases,
        outputs=outputs,
        seed=seed if inputs is None else None,
        dims=chosen,
        source=source,
    )


def synthesize(
    model: ir.Model, *, dims: dict[str, int] | None = None, seed: int = 0, shapes: int = 2
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, int]]]:
    """Random inputs for each graph input, one case per shape when the model has symbolic dims."""
    dims = dict(dims or {})
    graph_inputs = feed_inputs(model)
    symbolic = [
        d.value or f"?{i}.{axis}"
        for i, v in enumerate(graph_inputs)
        for axis, d in enumerate(v.shape or ())
        if isinstance(d, ir.SymbolicDim)
    ]
    unknown = sorted(set(dims) - {s for s in symbolic if not s.startswith("?")})
    if unknown:
        raise UsageError(f"--dim names no symbolic dim of the model: {', '.join(unknown)}")
    free = [s for s in dict.fromkeys(symbolic) if s not in dims]
    n_cases = max(1, shapes) if free else 1
    rng = np.random.default_rng(seed)
    cases, chosen = [], []
    for case in range(n_cases):
        sizes = dict(dims)
        for sym in free:
            sizes[sym] = dim_size(sym, case)
        feeds = {}
        for i, value in enumerate(graph_inputs):
            shape = []
            for axis, d in enumerate(value.shape or ()):
                shape.append(
                    sizes[d.value or f"?{i}.{axis}"] if isinstance(d, ir.SymbolicDim) else d
                )
            feeds[value.name] = random_array(rng, value, tuple(shape))
        cases.append(feeds)
        chosen.append({k: v for k, v in sizes.items() if not k.startswith("?")})
    return cases, chosen


def dim_size(symbol: str, case: int) -> int:
    """The size tried for a free symbolic dim in a captured case: batch 1, 2, 3…; others 16, 23…"""
    return 1 + case if "batch" in symbol.lower() else 16 + 7 * case


def random_array(rng: np.random.Generator, value: ir.Value, shape: tuple[int, ...]) -> np.ndarray:
    """Random data for one input: normal floats, 0/1 integers and booleans."""
    if value.dtype is None or value.shape is None:
        raise UnsupportedModelError(
            f"input '{value.name}' has no known type or shape; give --inputs"
        )
    dtype = value.dtype.numpy()
    if value.dtype.is_floating_point():
        return rng.standard_normal(shape).astype(dtype)
    if value.dtype == ir.DataType.BOOL:
        return rng.random(shape) < 0.5
    if value.dtype.is_integer():
        return rng.integers(0, 2, shape).astype(dtype)
    raise UnsupportedModelError(
        f"cannot synthesize input '{value.name}' of type {value.dtype}; give --inputs"
    )


def feed_inputs(model: ir.Model) -> list[ir.Value]:
    """Graph inputs that must be fed (inputs doubling as initializers have defaults)."""
    initializers = model.graph.initializers
    return [v for v in model.graph.inputs if v.name not in initializers]


def check_inputs(model: ir.Model, cases: list[dict[str, np.ndarray]]) -> None:
    """Raise UsageError unless every case feeds exactly the model's inputs, typed and ranked."""
    if not cases:
        raise UsageError("the golden set has no cases")
    expected = {v.name: v for v in feed_inputs(model)}
    accepted = {v.name for v in model.graph.inputs}
    for index, case in enumerate(cases):
        where = f"golden case {index}" if len(cases) > 1 else "golden inputs"
        missing = sorted(set(expected) - set(case))
        extra = sorted(set(case) - accepted)
        if missing or extra:
            raise UsageError(
                f"{where} do not match the model's inputs: "
                + "; ".join(
                    part
                    for part in (
                        f"missing {', '.join(missing)}" if missing else "",
                        f"unknown {', '.join(extra)}" if extra else "",
                    )
                    if part
                )
            )
        for name, value in expected.items():
            array = case[name]
            if value.dtype is not None and array.dtype != value.dtype.numpy():
                raise UsageError(
                    f"{where}: '{name}' is {array.dtype}, the model takes {value.dtype.numpy()}"
                )
            if value.shape is not None:
                if array.ndim != len(value.shape):
                    raise UsageError(
                        f"{where}: '{name}' has rank {array.ndim}, "
                        f"the model takes {len(value.shape)}"
                    )
                for axis, (got, want) in enumerate(zip(array.shape, value.shape, strict=True)):
                    if isinstance(want, int) and got != want:
                        raise UsageError(
                            f"{where}: '{name}' axis {axis} is {got}, the model takes {want}"
                        )


def _flatten(cases: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {f"{i}/{name}": array for i, case in enumerate(cases) for name, array in case.items()}
