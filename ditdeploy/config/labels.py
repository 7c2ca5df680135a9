"""Class names: the ``id2label`` table a model carries, and ``--labels`` given as names or ids.

A diffusers DiT snapshot stores its class names in ``model_index.json`` as ``id2label`` (``{"207": "golden retriever",
"0": "tench, Tinca tinca", ...}``; one entry may hold several comma-separated synonyms). ditdeploy copies that table
into the artifact manifest (field ``id2label``); the shipped ``digits`` model's classes are named "0".."9".
``resolve`` turns ``"golden retriever, volcano"`` / ``"207,980"`` / a mix into class ids, matching any synonym
case-insensitively; an unknown name is a one-line error listing close matches (difflib).

Stdlib only (the deploy path imports it).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any

from ditdeploy.errors import DitDeployError

__all__ = ["DIGIT_NAMES", "display_names", "for_model", "normalize", "parse_spec", "resolve", "resolve_items"]

DIGIT_NAMES: dict[int, str] = {i: str(i) for i in range(10)}
_CLOSE = 5  # how many close matches an error lists


def normalize(id2label: Mapping[Any, Any] | None, num_classes: int | None = None) -> dict[int, str] | None:
    """``{int id: name}`` from a JSON-style table (string keys); None for None/empty. Bad tables raise."""
    if not id2label:
        return None
    if not isinstance(id2label, Mapping):
        raise DitDeployError(f"id2label must be a mapping of class id -> name, got {type(id2label).__name__}")
    out: dict[int, str] = {}
    for k, v in id2label.items():
        try:
            i = int(k)
        except (TypeError, ValueError, OverflowError) as e:
            raise DitDeployError(f"id2label key {k!r} is not a class id") from e
        if not isinstance(v, str) or not v.strip():
            raise DitDeployError(f"id2label[{k!r}] is not a non-empty name")
        if i < 0 or (num_classes is not None and i >= num_classes):
            have = f"the model has classes 0..{num_classes - 1}" if num_classes is not None else "ids start at 0"
            raise DitDeployError(f"id2label names class {i}, but {have}")
        if i in out:
            raise DitDeployError(f"id2label names class {i} twice ({out[i]!r} and {v.strip()!r} under different "
                                 "keys): keep one entry per class")
        out[i] = v.strip()
    return dict(sorted(out.items()))


def for_model(manifest: Mapping[str, Any] | None, variant: str | None, num_classes: int) -> dict[int, str] | None:
    """The class names of a model: its manifest's ``id2label``, else "0".."9" for the digits model, else None."""
    table = (manifest or {}).get("id2label")
    if table:
        return normalize(table, num_classes)
    if (variant or "").lower() == "digits" and num_classes == len(DIGIT_NAMES):
        return dict(DIGIT_NAMES)
    return None


def display_names(id2label: Mapping[int, str] | None, num_classes: int) -> list[str] | None:
    """One short name per class id for grid captions: the first synonym, or the id when a class has no name."""
    if not id2label:
        return None
    return [id2label[i].split(",")[0].strip() if i in id2label else str(i) for i in range(num_classes)]


def _synonyms(id2label: Mapping[int, str]) -> dict[str, list[int]]:
    """Lower-cased synonym -> class ids having it (ImageNet has a few shared names, e.g. "crane")."""
    table: dict[str, list[int]] = {}
    for i, names in id2label.items():
        for s in {n.strip().lower() for n in names.split(",") if n.strip()} | {names.strip().lower()}:
            table.setdefault(s, []).append(i)
    return table


def _is_id(item: str) -> bool:
    return re.fullmatch(r"[+-]?[0-9]+", item) is not None


def _by_name(item: str, table: dict[str, list[int]], id2label: Mapping[int, str], num_classes: int) -> int:
    ids = table.get(" ".join(item.lower().split()))
    if ids is None:
        close = difflib.get_close_matches(item.lower(), list(table), n=_CLOSE, cutoff=0.6)
        hint = (("close matches: " + ", ".join(f"{c} ({table[c][0]})" for c in close)) if close
                else f"no close match; pass class ids 0..{num_classes - 1} instead")
        raise DitDeployError(f"--labels: unknown class name {item!r}: {hint}")
    if len(ids) > 1:
        which = ", ".join(f"{i} ({id2label[i]})" for i in sorted(ids))
        raise DitDeployError(f"--labels: class name {item!r} is ambiguous, it names {which}: pass the id")
    return ids[0]


def parse_spec(spec: str) -> list[int | str]:
    """A ``--labels`` value split at commas: class ids as ints, names as stripped strings (resolved later, against
    the model's id2label, by :func:`resolve_items`)."""
    items: list[str] = []
    for part in (s.strip() for s in spec.split(",")):
        words = part.split()
        # "3 7" (ids separated by spaces) is two ids, never class 37 or a name; names may contain spaces
        items += words if words and all(_is_id(w) for w in words) else ([part] if part else [])
    if not items:
        raise DitDeployError("--labels is empty: pass class ids or names like 207,360 (or leave --labels out for "
                             "the default classes)")
    return [int(s) if _is_id(s) else s for s in items]


def resolve_items(items: list[int | str], id2label: Mapping[int, str] | None, num_classes: int) -> list[int]:
    """Class ids for ids and/or names (case-insensitive; one-line errors naming close matches / ambiguity)."""
    bad = [v for v in items if isinstance(v, int) and not 0 <= v < num_classes]
    if bad:
        raise DitDeployError(f"labels {bad} out of range: this model has classes 0..{num_classes - 1}")
    names = [s for s in items if not isinstance(s, int)]
    if names and not id2label:
        raise DitDeployError(
            f"--labels {names[0]!r}: this model has no class names (no id2label in its manifest): pass "
            f"comma-separated class ids 0..{num_classes - 1}"
        )
    table = _synonyms(id2label or {})
    return [v if isinstance(v, int) else _by_name(v, table, id2label or {}, num_classes) for v in items]


def resolve(spec: str, id2label: Mapping[int, str] | None, num_classes: int) -> list[int]:
    """Class ids for a comma-separated ``--labels`` value of ids and/or names (case-insensitive)."""
    return resolve_items(parse_spec(spec), id2label, num_classes)
