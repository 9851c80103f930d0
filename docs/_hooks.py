"""MkDocs hooks: griffe finds ``onnxopt`` (package dir ``src/``), pass reference, placeholders."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

from onnxopt import pass_reference

SRC = Path(__file__).resolve().parent.parent / "src"
GENERATED = "reference/passes.md"
# Pages other work adds soon: until one exists, a placeholder keeps links to it from failing
# the strict build. Drop a name once its page has landed.
PENDING = {
    "report.md": "The HTML report",
    "examples.md": "Examples",
    "mixed-precision.md": "Mixed precision",
}
PLACEHOLDER = "This page is being written."
log = logging.getLogger("mkdocs.hooks.onnxopt")


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


def on_files(files: Files, config: Any) -> Files:
    """Add a placeholder for each pending page that does not exist yet."""
    for uri, title in PENDING.items():
        if files.get_file_from_path(uri) is None:
            log.info("placeholder for missing page %s", uri)
            content = f"# {title}\n\n{PLACEHOLDER}\n"
            files.append(File.generated(config, uri, content=content))
    return files


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """Fill the pass reference page from the registry."""
    if page.file.src_uri != GENERATED:
        return markdown
    return markdown.replace("{{ pass_reference }}", pass_reference.markdown())


def on_page_content(html: str, page: Any, **kwargs: Any) -> str:
    """A placeholder has none of its page's anchors: links to them are not checked."""
    if page.file.generated_by and PLACEHOLDER in page.markdown:
        page.present_anchor_ids = None
    return html
