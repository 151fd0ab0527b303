"""README's peers section after a partial run: the cells this run did not measure keep their earlier values.

``cpn bench gateway --peers --cells c32 --readme`` measures one cell; the section it writes keeps
what the README showed for the other cells (and for systems not run this time), each such value
marked with a footnote (¹, ², ...) naming the run it came from: the previous section's own
description line for the values that were fresh there, or the footnote they already carried.
Nothing is ever shown unmarked that this run did not measure. Pure text in, text out.
"""

from __future__ import annotations

import re

from bench.peers import ORDER, VERDICT_NAMES

MARKS = "¹²³⁴⁵⁶⁷⁸⁹"
SYSTEM_COLUMNS = ("c32", "c32", "c32", "c1", "ttfc8")
"""Which cell each figure column of the systems table comes from (after the name column)."""
_MARK = re.compile(rf" ([{MARKS}])$")
_NOTE = re.compile(rf"^([{MARKS}]) ")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _line(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _system(name_cell: str) -> str:
    return name_cell.split(" (", 1)[0].strip()


def _blocks(section: str) -> list[list[str]]:
    out: list[list[str]] = []
    for part in section.strip().split("\n\n"):
        lines = [ln for ln in part.splitlines() if ln.strip()]
        if lines:
            out.append(lines)
    return out


class _Previous:
    """What the previous section showed: its two tables, its description line and its footnotes."""

    def __init__(self, section: str) -> None:
        self.systems: dict[str, list[str]] = {}
        self.verdicts: dict[str, list[str]] = {}
        self.verdict_head: list[str] = []
        self.notes: dict[str, str] = {}
        self.run = ""
        for block in _blocks(section):
            first = block[0]
            if first.startswith("| system |"):
                self.systems = {_system(_cells(ln)[0]): _cells(ln) for ln in block[2:]}
            elif first.startswith("| cpn vs"):
                self.verdict_head = block[:2]
                self.verdicts = {_cells(ln)[0]: _cells(ln) for ln in block[2:]}
            elif _NOTE.match(first):
                for ln in block:
                    if m := _NOTE.match(ln):
                        self.notes[m.group(1)] = ln[len(m.group(0)):]
            elif not first.startswith(("|", "cpn vs", "Not measured yet")):
                self.run = " ".join(block)


def _run_name(description: str) -> str:
    """"2 cores, …, 2026-12-07; 3 interleaved round(s) of 10 s per cell, medians …" -> "2 cores, …, 2026-12-07;
    3 interleaved round(s) of 10 s per cell": the machine, the date and the run's length."""
    parts = [p.strip() for p in description.split(";")[:2]]
    return "; ".join(parts[:1] + [p.split(", medians", 1)[0] for p in parts[1:]]).rstrip(".")


def merge(previous: str, fresh: str, measured: dict[str, set[str]]) -> str:
    """``fresh`` (this run's section) with the cells it did not measure taken from ``previous``.

    ``measured``: per system run this time, the cells it ran (``c32``, ``c1``, ``ttfc8``). A cell
    kept from ``previous`` keeps its mark if it had one, else gets the mark of the previous run."""
    prev = _Previous(previous)
    if not prev.systems and not prev.verdicts:
        return fresh
    blocks = _blocks(fresh)
    used: set[str] = set()
    new_mark: list[str] = []  # the mark given to the previous run's own (unmarked) values, once needed

    def keep(value: str) -> str:
        if value in ("", "—"):
            return value
        m = _MARK.search(value)
        if m:
            used.add(m.group(1))
            return value
        if not new_mark:
            new_mark.append(next(c for c in MARKS if c not in prev.notes))
        used.add(new_mark[0])
        return f"{value} {new_mark[0]}"

    all_cells = set(SYSTEM_COLUMNS)
    out: list[list[str]] = []
    for block in blocks:
        if block[0].startswith("| system |"):
            rows = {_system(_cells(ln)[0]): _cells(ln) for ln in block[2:]}
            order = list(rows) + [s for s in prev.systems if s not in rows]
            lines = block[:2]
            for system in _ordered(order, list(prev.systems)):
                row = rows.get(system)
                old = prev.systems.get(system)
                if row is None and old is not None:
                    row = [old[0]] + [keep(v) for v in old[1:]]
                elif row is not None and old is not None:
                    for i, cell in enumerate(SYSTEM_COLUMNS, start=1):
                        if cell not in measured.get(system, all_cells) and i < len(old):
                            row[i] = keep(old[i])
                if row is not None:
                    lines.append(_line(row))
            out.append(lines)
        elif block[0].startswith(("| cpn vs", "cpn vs")):
            fresh_rows = {_cells(ln)[0]: _cells(ln) for ln in block[2:]} if block[0].startswith("|") else {}
            kept = {label: row for label, row in prev.verdicts.items() if label not in fresh_rows}
            if not kept:
                out.append(block)
                continue
            head = block[:2] if fresh_rows else prev.verdict_head
            lines = list(head)
            labels = [label for label, _ in VERDICT_NAMES.values()]
            for label in labels + [x for x in kept if x not in labels]:
                if label in fresh_rows:
                    lines.append(_line(fresh_rows[label]))
                elif label in kept:
                    row = kept[label]
                    lines.append(_line([row[0], keep(row[1]), *row[2:]]))
            out.append(lines)
        else:
            out.append(block)
    notes = []
    for mark in MARKS:
        if mark not in used:
            continue
        if new_mark and mark == new_mark[0]:
            notes.append(f"{mark} from an earlier run ({_run_name(prev.run) or 'not described'}), not re-measured since.")
        else:
            notes.append(f"{mark} {prev.notes.get(mark, 'from an earlier run, not re-measured since.')}")
    if notes:
        out.append(notes)
    return "\n\n".join("\n".join(b) for b in out)


def _ordered(names: list[str], previous_order: list[str]) -> list[str]:
    """The systems in the bench's own order (bench.peers.ORDER), unknown names last."""
    return sorted(dict.fromkeys(names), key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER) + previous_order.index(n))
