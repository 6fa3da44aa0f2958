"""Read a rendered nginx configuration with crossplane (a real nginx config parser) for assertions."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeAlias

import crossplane

Directive: TypeAlias = dict[str, Any]


def parse(conf: Path) -> list[Directive]:
    """The directives of ``conf`` with every ``include`` expanded in place."""
    result = crossplane.parse(str(conf), combine=True)
    if result["status"] != "ok":
        raise AssertionError(f"crossplane could not parse {conf}: {result['errors']}")
    parsed: list[Directive] = result["config"][0]["parsed"]
    return parsed


def find(block: list[Directive], name: str) -> list[Directive]:
    return [d for d in block if d["directive"] == name]


def one(block: list[Directive], name: str, *args: str) -> Directive:
    found = [d for d in find(block, name) if not args or d["args"][: len(args)] == list(args)]
    assert len(found) == 1, f"expected one {name} {args}, found {len(found)}"
    return found[0]


def walk(block: list[Directive]) -> Iterator[Directive]:
    for directive in block:
        yield directive
        yield from walk(directive.get("block", []))


def seconds(value: str) -> float:
    """An nginx time value (``1h``, ``30s``, ``75``) in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    total = 0.0
    for number, unit in re.findall(r"(\d+)(ms|s|m|h|d)?", value):
        total += int(number) * units[unit or "s"]
    return total
