"""``ast.parse`` for the tests that read the source, safe from CPython 3.11's spurious
``SystemError: AST constructor recursion depth mismatch`` (python/cpython#106905).

The AST constructor compares the interpreter's recursion depth before and after building the tree; a
garbage collection during the build can run finalizers (of sockets, transports, generators left by
earlier tests in the same process) that leave the count off and the parse fails. The collector is
paused for the parse, which touches only the file's text.
"""

from __future__ import annotations

import ast
import gc
from pathlib import Path


def parse(path: Path) -> ast.Module:
    text = path.read_text()
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(text, filename=str(path))
    finally:
        if enabled:
            gc.enable()
