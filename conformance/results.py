"""Checks, their outcomes, and the capability report (terminal table and Markdown).

A :class:`Check` is a named callable. It passes by returning (optionally a short
detail string), is skipped by raising :class:`Skip` with the reason, and fails by
raising anything else: ``AssertionError`` carries the check's own message, any other
exception is reported with its type and the innermost frames of its traceback.
"""
from __future__ import annotations

import shutil
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

PASS, FAIL, SKIP = "pass", "fail", "skip"


class Skip(Exception):
    """Raised by a check that does not apply here; the message is the reason."""


@dataclass
class Check:
    """One conformance check: ``id`` is unique and stable (``area/subject/case``)."""

    id: str
    area: str  # "platform", "attention", "refusal", "kernel", "e2e", "setup"
    title: str
    fn: Callable[[], str | None]

    def run(self) -> "Result":
        start = time.perf_counter()
        try:
            detail = self.fn() or ""
            status = PASS
        except Skip as exc:
            status, detail = SKIP, str(exc)
        except AssertionError as exc:
            status, detail = FAIL, str(exc) or "assertion failed"
        except Exception as exc:  # noqa: BLE001 - a crashing check is a failing check
            frames = traceback.format_exception(type(exc), exc, exc.__traceback__)
            status, detail = FAIL, f"{type(exc).__name__}: {exc}\n" + "".join(frames[-3:]).rstrip()
        return Result(self, status, detail, time.perf_counter() - start)


@dataclass
class Result:
    """The outcome of one check."""

    check: Check
    status: str
    detail: str
    seconds: float = 0.0


@dataclass
class Report:
    """Every result of one suite run, with facts about the plugin under test."""

    plugin: str
    facts: dict = field(default_factory=dict)
    results: list[Result] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def ok(self) -> bool:
        """True when nothing failed (skips are fine: each says why)."""
        return self.count(FAIL) == 0

    def summary(self) -> str:
        seconds = sum(r.seconds for r in self.results)
        return (f"{self.count(PASS)} passed, {self.count(FAIL)} failed, {self.count(SKIP)} skipped "
                f"({len(self.results)} checks of plugin {self.plugin!r} in {seconds:.1f}s)")

    # -- rendering -------------------------------------------------------------------------
    def table(self, width: int | None = None) -> str:
        """A plain-text table for the terminal: one row per check, failures spelled out below."""
        width = width or max(shutil.get_terminal_size((140, 24)).columns, 100)
        rows = [(r.status.upper(), r.check.id, _first_line(r.detail)) for r in self.results]
        w_id = min(max([len(r[1]) for r in rows] + [5]), 64)
        lines = [f"tokenmill conformance: plugin {self.plugin}"]
        lines += [f"  {k}: {v}" for k, v in self.facts.items()]
        lines.append("")
        lines.append(f"{'RESULT':6}  {'CHECK':{w_id}}  DETAIL")
        lines.append(f"{'-' * 6}  {'-' * w_id}  {'-' * 20}")
        for status, cid, detail in rows:
            room = max(width - w_id - 10, 20)
            lines.append(f"{status:6}  {cid:{w_id}}  {detail[:room]}")
        failures = [r for r in self.results if r.status == FAIL]
        if failures:
            lines += ["", "FAILURES"]
            for r in failures:
                lines.append(f"- {r.check.id}: {r.check.title}")
                lines += [f"    {line}" for line in r.detail.splitlines()]
        lines += ["", self.summary()]
        return "\n".join(lines)

    def markdown(self) -> str:
        """The capability report as Markdown: facts, then one table row per check."""
        out = [f"# Conformance report: `{self.plugin}`", ""]
        for k, v in self.facts.items():
            out.append(f"- **{k}**: {v}")
        out += ["", f"**{self.summary()}**", ""]
        areas: dict[str, list[Result]] = {}
        for r in self.results:
            areas.setdefault(r.check.area, []).append(r)
        for area, results in areas.items():
            out += [f"## {area}", "", "| check | result | detail |", "|---|---|---|"]
            for r in results:
                mark = {PASS: "pass", FAIL: "**FAIL**", SKIP: "skip"}[r.status]
                out.append(f"| `{r.check.id}` | {mark} | {_md_cell(r.detail)} |")
            out.append("")
        return "\n".join(out)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _md_cell(text: str) -> str:
    return _first_line(text).replace("|", "\\|")[:300]
