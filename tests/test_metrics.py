"""Output comparison metrics and tolerances."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnxopt import Tolerance, UsageError
from onnxopt.metrics import DEFAULT_TOLERANCES, compare, compare_all

EXACT = DEFAULT_TOLERANCES["exact"]


def test_metrics_match_their_definitions(rng) -> None:
    a = rng.standard_normal(1000).astype(np.float32)
    noise = 0.01 * rng.standard_normal(1000).astype(np.float32)
    m = compare(a, a + noise, Tolerance())
    a64, n64 = a.astype(np.float64), (a + noise).astype(np.float64) - a
    assert m.max_abs == pytest.approx(np.abs(n64).max())
    assert m.rel_l2 == pytest.approx(np.linalg.norm(n64) / np.linalg.norm(a64))
    assert m.snr_db == pytest.approx(10 * math.log10((a64**2).sum() / (n64**2).sum()))
    b = a64 + n64
    assert m.cosine == pytest.approx(a64 @ b / np.linalg.norm(a64) / np.linalg.norm(b))


def test_exact_tolerance_is_elementwise() -> None:
    golden = np.array([1.0, 100.0], np.float32)
    assert compare(golden, golden + np.float32(5e-5), EXACT).passed
    assert compare(golden, np.array([1.0, 100.05], np.float32), EXACT).passed  # rtol
    failed = compare(golden, np.array([1.01, 100.0], np.float32), EXACT, "y")
    assert not failed.passed
    assert "'y'" in failed.reason and "(0,)" in failed.reason


def test_shape_dtype_nan_and_integers() -> None:
    x = np.ones((2, 3), np.float32)
    assert not compare(x, x.reshape(3, 2), EXACT).passed
    assert not compare(x, x.astype(np.float64), EXACT).passed
    nan = np.array([np.nan, 1.0], np.float32)
    assert compare(nan, nan.copy(), EXACT).passed
    assert not compare(nan, np.array([0.0, 1.0], np.float32), EXACT).passed
    assert compare(np.arange(3), np.arange(3), EXACT).passed
    assert not compare(np.arange(3), np.arange(3) + 1, EXACT).passed


def test_budget_criteria() -> None:
    a = np.linspace(-1, 1, 100, dtype=np.float32)
    noisy = a + 0.05 * np.cos(np.arange(100, dtype=np.float32))
    assert compare(a, noisy, Tolerance(min_cosine=0.99)).passed
    assert not compare(a, noisy, Tolerance(min_cosine=0.9999)).passed
    assert not compare(a, noisy, Tolerance(min_snr_db=40)).passed


def test_compare_all_takes_the_worst_and_names_the_case() -> None:
    good = {"y": np.zeros(4, np.float32)}
    bad = {"y": np.ones(4, np.float32)}
    total = compare_all([good, good], [good, bad], EXACT)
    assert not total.passed and total.reason.startswith("case 1:")
    assert not compare_all([good], [{}], EXACT).passed


def test_tolerance_replace_rejects_unknown_keys() -> None:
    assert EXACT.replace(atol=1.0).atol == 1.0
    with pytest.raises(UsageError):
        EXACT.replace(tol=1.0)


def test_half_precision_outputs_get_a_few_ulps_of_slack() -> None:
    tol = Tolerance(atol=1e-4, rtol=1e-3)
    golden = np.array([2.0, -3.5, 0.25], np.float16)
    two_ulps = np.nextafter(np.nextafter(golden, np.float16(np.inf)), np.float16(np.inf))
    assert compare(golden, two_ulps, tol).passed  # 2**-8 apart at 2.0: rtol 1e-3 alone fails
    assert not compare(golden.astype(np.float32), two_ulps.astype(np.float32), tol).passed
    far = (golden.astype(np.float32) * 1.01).astype(np.float16)  # ~10 ulps
    result = compare(golden, far, tol)
    assert not result.passed and "rtol=0.00390625" in result.reason
