"""Writes one benchmark's section of a figures document (docs/benchmarks.md, docs/reliability.md), leaving the rest."""

from __future__ import annotations

import os
import re

_DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
BENCHMARKS_DOC = os.path.join(_DOCS, "benchmarks.md")
RELIABILITY_DOC = os.path.join(_DOCS, "reliability.md")
_SECTIONS_NOTE = "Each section is written by the script it names; rerun the command to refresh it.\n"
_HEADERS = {BENCHMARKS_DOC: f"# Benchmarks\n\n{_SECTIONS_NOTE}", RELIABILITY_DOC: f"# Reliability\n\n{_SECTIONS_NOTE}"}


def write_section(name: str, body: str, path: str = BENCHMARKS_DOC) -> None:
    """Replaces (or appends) the section between ``<!-- name -->`` markers."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    text = open(path).read() if os.path.exists(path) else _HEADERS.get(path, _SECTIONS_NOTE)
    section = f"{begin}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else f"{text.rstrip()}\n\n{section}\n"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)
