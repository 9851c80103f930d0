"""Comparing outputs: max abs error, relative L2, cosine, SNR; tolerances per pass kind."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from onnxopt.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """What counts as "the same". ``None`` leaves a criterion unchecked.

    ``atol``/``rtol`` apply elementwise (``|a - b| <= atol + rtol * |b|``); ``min_cosine`` and
    ``min_snr_db`` apply to each output as a whole. Integer, bool and string outputs must be equal.
    For half-precision outputs (float16, bfloat16) ``atol`` and ``rtol`` are at least
    ``HALF_ULPS`` units of that type's epsilon: a fused kernel rounds once where the subgraph
    rounded at every step, which moves a half result by an ulp or two.
    """

    atol: float | None = None
    rtol: float | None = None
    min_cosine: float | None = None
    min_snr_db: float | None = None

    def replace(self, **changes: float | None) -> Tolerance:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise UsageError(f"unknown tolerance key(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        parts = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)]
        return ", ".join(p for p in parts if not p.endswith("=None"))


HALF_ULPS = 4

DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "exact": Tolerance(atol=1e-4, rtol=1e-3),
    "interface": Tolerance(atol=1e-4, rtol=1e-3),
    "approximate": Tolerance(min_cosine=0.99),
}


@dataclasses.dataclass
class Metrics:
    """How far ``actual`` is from ``expected`` (worst over the tensors compared)."""

    max_abs: float = 0.0
    rel_l2: float = 0.0
    cosine: float = 1.0
    snr_db: float = math.inf
    passed: bool = True
    reason: str = ""

    def merge(self, other: Metrics) -> Metrics:
        """The worse of two comparisons, keeping the first failure's reason."""
        return Metrics(
            max_abs=max(self.max_abs, other.max_abs),
            rel_l2=max(self.rel_l2, other.rel_l2),
            cosine=min(self.cosine, other.cosine),
            snr_db=min(self.snr_db, other.snr_db),
            passed=self.passed and other.passed,
            reason=self.reason or other.reason,
        )

    def as_dict(self) -> dict[str, float | bool | str]:
        data = dataclasses.asdict(self)
        for key in ("snr_db", "max_abs", "rel_l2", "cosine"):
            if math.isinf(data[key]) or math.isnan(data[key]):
                data[key] = str(data[key])
        return data


def compare(expected: np.ndarray, actual: np.ndarray, tol: Tolerance, name: str = "") -> Metrics:
    """Compare one tensor against its golden value."""
    label = f"'{name}' " if name else ""
    if expected.shape != actual.shape:
        return Metrics(
            passed=False, reason=f"{label}shape {actual.shape} != golden {expected.shape}"
        )
    if expected.dtype != actual.dtype:
        return Metrics(
            passed=False, reason=f"{label}dtype {actual.dtype} != golden {expected.dtype}"
        )
    if not np.issubdtype(expected.dtype, np.floating):
        equal = bool(np.array_equal(expected, actual))
        return Metrics(
            max_abs=0.0 if equal else math.inf,
            rel_l2=0.0 if equal else math.inf,
            cosine=1.0 if equal else -1.0,
            passed=equal,
            reason="" if equal else f"{label}values differ",
        )
    exp = expected.astype(np.float64)
    act = actual.astype(np.float64)
    nan_mismatch = bool(np.any(np.isnan(exp) != np.isnan(act)))
    finite = np.isfinite(exp) & np.isfinite(act)
    inf_mismatch = bool(np.any(~finite & ~np.isnan(exp) & (exp != act)))
    diff = np.where(finite, act - exp, 0.0)
    max_abs = float(np.max(np.abs(diff))) if diff.size else 0.0
    signal = float(np.sum(np.where(finite, exp, 0.0) ** 2))
    noise = float(np.sum(diff**2))
    rel_l2 = math.sqrt(noise / signal) if signal > 0 else (0.0 if noise == 0 else math.inf)
    snr_db = (
        math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)
    )
    norms = math.sqrt(signal) * math.sqrt(float(np.sum(np.where(finite, act, 0.0) ** 2)))
    cosine = (
        1.0
        if noise == 0
        else (float(np.sum(np.where(finite, exp * act, 0.0))) / norms if norms else 0.0)
    )
    metrics = Metrics(max_abs=max_abs, rel_l2=rel_l2, cosine=cosine, snr_db=snr_db)

    failures = []
    if nan_mismatch or inf_mismatch:
        failures.append("NaN/Inf positions differ")
    if tol.atol is not None or tol.rtol is not None:
        atol, rtol = tol.atol or 0.0, tol.rtol or 0.0
        if expected.dtype.itemsize <= 2:
            floor = HALF_ULPS * float(np.finfo(expected.dtype).eps)
            atol, rtol = max(atol, floor), max(rtol, floor)
        bound = atol + rtol * np.abs(exp)
        over = np.abs(diff) > bound
        if np.any(over):
            index = np.unravel_index(int(np.argmax(np.abs(diff) - bound)), diff.shape)
            failures.append(
                f"{int(over.sum())} of {diff.size} values outside atol={atol:g}, rtol={rtol:g} "
                f"(max abs {max_abs:.3g}; worst at {tuple(int(i) for i in index)})"
            )
    if tol.min_cosine is not None and cosine < tol.min_cosine:
        failures.append(f"cosine {cosine:.6f} < {tol.min_cosine}")
    if tol.min_snr_db is not None and snr_db < tol.min_snr_db:
        failures.append(f"SNR {snr_db:.2f} dB < {tol.min_snr_db} dB")
    if failures:
        metrics.passed = False
        metrics.reason = label + "; ".join(failures)
    return metrics


def compare_all(
    expected: list[dict[str, np.ndarray]], actual: list[dict[str, np.ndarray]], tol: Tolerance
) -> Metrics:
    """Compare every output of every golden case; the worst result wins."""
    total = Metrics()
    for case, (exp_case, act_case) in enumerate(zip(expected, actual, strict=False)):
        for name, exp in exp_case.items():
            if name not in act_case:
                total = total.merge(Metrics(passed=False, reason=f"output '{name}' is missing"))
                continue
            result = compare(exp, act_case[name], tol, name)
            if not result.passed and len(expected) > 1:
                result.reason = f"case {case}: {result.reason}"
            total = total.merge(result)
    return total
