"""Rewrite tests/backend_expected_skips.json: the backend cases ORT cannot run as they are.

Usage: ``python tests/tools/make_backend_skips.py`` (deterministic: same onnx and ORT
versions, same file).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_backend_corpus import CASES, SKIPS_PATH, OrtFailure, run_ort


def main() -> None:
    skips: dict[str, str] = {}
    for case in CASES:
        proto = case.model_proto()
        try:
            run_ort(proto.SerializeToString(), proto, case)
        except OrtFailure as err:
            skips[case.id] = str(err)
    SKIPS_PATH.write_text(json.dumps(skips, indent=2, sort_keys=True) + "\n")
    kinds = Counter(c.kind for c in CASES)
    skipped = Counter(name.split("/", 1)[0] for name in skips)
    for kind, total in kinds.items():
        print(f"{kind}: {total} cases, {skipped[kind]} expected skips")
    print(f"wrote {len(skips)} of {len(CASES)} cases to {SKIPS_PATH}")


if __name__ == "__main__":
    main()
