"""MkDocs hooks: griffe finds ``onnxopt`` (its package dir is ``src/``); the pass reference."""

from __future__ import annotations

import contextlib
import hashlib
import sys
import tempfile
from pathlib import Path
from typing import Any

from mkdocs.plugins import event_priority

from onnxopt import pass_reference

SRC = Path(__file__).resolve().parent.parent / "src"
GENERATED = "reference/passes.md"


@event_priority(100)  # before mkdocstrings reads sys.path in its own on_config
def on_config(config: Any) -> Any:
    """Append a folder holding ``onnxopt -> src`` to the path griffe searches for packages.

    The folder is named after this checkout and reused by every build (nothing to clean up).
    """
    digest = hashlib.sha1(str(SRC).encode()).hexdigest()[:10]
    shim = Path(tempfile.gettempdir()) / f"onnxopt-docs-{digest}"
    link = shim / "onnxopt"
    if not link.is_symlink():
        shim.mkdir(exist_ok=True)
        with contextlib.suppress(FileExistsError):  # a build running beside this one made it
            link.symlink_to(SRC, target_is_directory=True)
    if str(shim) not in sys.path:
        sys.path.append(str(shim))
    return config


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """Fill the pass reference page from the registry."""
    if page.file.src_uri != GENERATED:
        return markdown
    return markdown.replace("{{ pass_reference }}", pass_reference.markdown())
