"""Metadata conditions for search: `search(..., conditions=[at_least("year", 2020), any_of("venue", [...])])`.

Every condition must hold (AND), in every search mode. Metadata values are strings; a range reads a
value as a decimal number ("2020", "-1.5", "3e-7") and never matches one that is not a number.
"""

from __future__ import annotations

from collections.abc import Iterable

from .v1 import search_pb2 as spb


def equals(key: str, value: str) -> spb.MetadataCondition:
    """metadata[key] == value."""
    return spb.MetadataCondition(key=key, equals=value)


def any_of(key: str, values: Iterable[str]) -> spb.MetadataCondition:
    """metadata[key] is one of `values` (1 to 1,024 strings)."""
    if isinstance(values, str):
        raise TypeError("values must be an iterable of strings, not a single string")
    return spb.MetadataCondition(key=key, any_of=spb.StringSet(values=list(values)))


def in_range(
    key: str,
    *,
    gt: float | None = None,
    gte: float | None = None,
    lt: float | None = None,
    lte: float | None = None,
) -> spb.MetadataCondition:
    """metadata[key], read as a number, within the given bounds (at least one)."""
    bounds = {
        name: float(bound) for name, bound in (("gt", gt), ("gte", gte), ("lt", lt), ("lte", lte)) if bound is not None
    }
    return spb.MetadataCondition(key=key, range=spb.NumericRange(**bounds))


def at_least(key: str, number: float) -> spb.MetadataCondition:
    """metadata[key] >= number, e.g. at_least("year", 2020)."""
    return in_range(key, gte=number)


def at_most(key: str, number: float) -> spb.MetadataCondition:
    """metadata[key] <= number."""
    return in_range(key, lte=number)
