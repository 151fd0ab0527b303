"""Reading layout files: the only file I/O in ``topology``.

``load``/``loads`` parse TOML and hand the document to :func:`topology.fileformat.from_dict`, which
validates it. Every failure, a TOML syntax error included, is a :class:`layout.LayoutError` whose
messages start with the file name (and the line, where known).
"""

from __future__ import annotations

import pathlib
import re
import tomllib

from . import fileformat, provinces
from .layout import Layout, LayoutError

_DATA = pathlib.Path(__file__).resolve().parent / "data"

_ARRAY_RE = re.compile(r"^\s*\[\[\s*(sites|origins|links)\s*\]\]\s*(#.*)?$")
_TABLE_RE = re.compile(r'^\s*\[\s*(accelerators|tariffs|defaults|regions)\s*\.\s*"?([^\]"]+?)"?\s*\]\s*(#.*)?$')


def default_path() -> pathlib.Path:
    """Path of the shipped national layout (``topology/data/national.toml``)."""
    return _DATA / "national.toml"


def data_path(name: str) -> pathlib.Path:
    """Path of a layout shipped in ``topology/data`` (``"demo-3"`` -> ``demo-3.toml``)."""
    return _DATA / (name if name.endswith(".toml") else f"{name}.toml")


def load(path: str | pathlib.Path) -> Layout:
    """Read and validate a layout file.

    Raises:
        LayoutError: the file cannot be read, is not TOML, or is not a valid layout.
    """
    p = pathlib.Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LayoutError([f"{p}: cannot read: {exc}"]) from None
    return loads(text, str(p))


def loads(text: str, filename: str = "<string>") -> Layout:
    """Parse and validate layout TOML held in a string (``filename`` is used in messages)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LayoutError([f"{filename}: not valid TOML: {exc}"]) from None
    return fileformat.from_dict(doc, filename, entry_lines(text))


def load_default() -> Layout:
    """The shipped national layout."""
    return load(default_path())


def entry_lines(text: str) -> fileformat.Lines:
    """Line numbers of ``[[sites]]``/``[[origins]]``/``[[links]]`` entries and named tables."""
    out: fileformat.Lines = {}
    counts = {"sites": 0, "origins": 0, "links": 0}
    for n, line in enumerate(text.splitlines(), start=1):
        m = _ARRAY_RE.match(line)
        if m:
            section = m.group(1)
            out[(section, counts[section])] = n
            counts[section] += 1
            continue
        m = _TABLE_RE.match(line)
        if m:
            out[(m.group(1), m.group(2).strip())] = n
    return out


def load_provinces(path: pathlib.Path = provinces.DATA) -> tuple[list[provinces.Province], str]:
    """The shipped province outlines (topology/provinces.py) and the sentence saying where they come from."""
    import json

    doc = json.loads(path.read_text(encoding="utf-8"))
    return provinces.parse(doc), str(doc["source"])
