"""The ``stream`` pass: every streaming family at once (RNN states, conv and attention caches)."""

from __future__ import annotations

from onnxopt.registry import register_pass
from onnxopt.streaming import FAMILY_PASSES, StreamPassBase


@register_pass
class StreamPass(StreamPassBase):
    """Make a causal model streaming: RNN states, conv caches and attention caches alike.

    Runs the rules of ``stream-rnn``, ``stream-conv`` and ``stream-attention`` together, as a
    model mixing them (a conformer: attention and convs) only streams when all are rewritten.
    """

    name = "stream"
    families = frozenset(FAMILY_PASSES)
    left_context: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.left_context is not None and self.left_context < 0:
            raise ValueError(f"left_context must be 0 or more, not {self.left_context}")
