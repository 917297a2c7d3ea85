"""Routing: which pipelines a complete series goes to, or why none.

A pipeline's ``match`` is a conjunction over keys; each key lists the values any of which may
match. Modality, Body Part Examined and SOP Class UID compare exactly (code strings ignore case),
the calling AE title exactly, Series Description as a case-insensitive glob (``*CHEST*``).
A series the node created itself (Manufacturer ``dicom-node``) is never routed, so a PACS rule
that forwards everything back to the node cannot make a loop.
"""

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

from dicom_node import MANUFACTURER
from dicom_node.config import Pipeline


@dataclass(frozen=True)
class SeriesFacts:
    """What routing looks at, gathered from the index."""

    modality: str
    body_part_examined: str
    series_description: str
    calling_ae_title: str
    manufacturer: str
    sop_class_uids: frozenset[str]


@dataclass(frozen=True)
class Route:
    """The pipelines a series goes to; when there are none, ``reason`` says why."""

    pipelines: tuple[Pipeline, ...]
    reason: str = ""


def _mismatch(key: str, wanted: Sequence[str], facts: SeriesFacts) -> str | None:
    """None if ``facts`` satisfy ``key``, else a short reason."""
    if key == "sop_class_uid":
        ok = bool(facts.sop_class_uids & set(wanted))
        return None if ok else f"SOP classes {sorted(facts.sop_class_uids)} not in {list(wanted)}"
    if key == "series_description":
        text = facts.series_description.lower()
        ok = any(fnmatch.fnmatchcase(text, pattern.lower()) for pattern in wanted)
        description = facts.series_description
        return None if ok else f"series description {description!r} matches none of {list(wanted)}"
    value = getattr(facts, key)
    if key in ("modality", "body_part_examined"):
        ok = value.upper() in {w.upper() for w in wanted}
    else:
        ok = value in wanted
    return None if ok else f"{key.replace('_', ' ')} {value!r} not in {list(wanted)}"


def route(facts: SeriesFacts, pipelines: Sequence[Pipeline]) -> Route:
    """The pipelines whose ``match`` the series satisfies, in configuration order."""
    if facts.manufacturer == MANUFACTURER:
        return Route((), f"created by this node (Manufacturer {MANUFACTURER!r}): never routed again")
    if not pipelines:
        return Route((), "no pipelines are configured")
    matched, reasons = [], []
    for pipeline in pipelines:
        misses = [m for key, wanted in pipeline.match.items()
                  if (m := _mismatch(key, wanted, facts)) is not None]
        if misses:
            reasons.append(f"{pipeline.name}: {'; '.join(misses)}")
        else:
            matched.append(pipeline)
    return Route(tuple(matched), "" if matched else "no pipeline matches: " + " | ".join(reasons))
