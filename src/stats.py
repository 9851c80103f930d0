"""Counting a graph: op histograms, node and initializer counts, what a pass removed."""

from __future__ import annotations

from collections import Counter

import onnx_ir as ir


def op_histogram(model: ir.Model) -> Counter[str]:
    """How many nodes of each op type the model has, subgraphs included."""
    return Counter(
        f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        for node in model.graph.all_nodes()
    )


def node_count(model: ir.Model) -> int:
    return sum(1 for _ in model.graph.all_nodes())


def removed_ops(before: Counter[str], after: Counter[str]) -> dict[str, int]:
    """Op types that lost nodes, with how many."""
    return {op: n - after.get(op, 0) for op, n in sorted(before.items()) if n > after.get(op, 0)}


def initializer_count(model: ir.Model) -> int:
    return len(model.graph.initializers) + sum(len(g.initializers) for g in model.graph.subgraphs())


def add_count(counts: dict[str, int], rule: str, n: int) -> None:
    """Add ``n`` firings of ``rule`` (rules that never fired stay out of the counts)."""
    if n > 0:
        counts[rule] = counts.get(rule, 0) + n
