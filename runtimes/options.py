"""Backend options: the typed, validated set each backend accepts.

Every backend's entry points (``load_denoiser`` / ``load_decoder``) take keyword-only, type-annotated options and
no ``**kwargs``: that signature *is* the option set. :func:`options_for` reads it, and :func:`validate` turns a
misspelt or foreign option into one line naming the valid ones (``ditdeploy.runtimes.load`` calls it before
anything loads), e.g. ``load("m.onnx", thread=1)`` -> ``unknown option 'thread' for the onnxruntime denoiser (did
you mean 'threads'?); valid options: providers, threads, ...``. Stdlib only.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from ditdeploy.errors import DitDeployError

_NOT_OPTIONS = ("self", "path")


def accepted(entry: Callable[..., Any]) -> tuple[str, ...]:
    """The option names a backend entry point (function or class) takes: its keyword parameters but the path."""
    params = inspect.signature(entry).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        raise TypeError(f"{getattr(entry, '__qualname__', entry)} takes **kwargs: its options cannot be validated")
    return tuple(p.name for p in params if p.name not in _NOT_OPTIONS
                 and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))


_SIMPLE = {"int": int, "float": (int, float), "bool": bool, "str": str, "None": type(None)}


def _type_error(name: str, annotation: Any, value: Any) -> str | None:
    """Why ``value`` does not fit a simple annotation (``int | None``, ``str``, ``bool``...); None when it fits or the
    annotation is not a simple one."""
    alts = [a.strip() for a in str(annotation).split("|")]
    if annotation is inspect.Parameter.empty or any(a not in _SIMPLE for a in alts):
        return None
    if isinstance(value, bool) and "bool" not in alts:
        return f"option {name!r} takes {' or '.join(alts)}, got {value!r}"
    if any(isinstance(value, _SIMPLE[a]) for a in alts):
        return None
    return f"option {name!r} takes {' or '.join(alts)}, got {value!r}"


def validate(backend: str, kind: str, entry: Callable[..., Any], opts: Mapping[str, Any]) -> None:
    """Raise a one-line DitDeployError for an option ``entry`` does not take (naming the valid ones) or a value of
    the wrong type (``threads="two"``)."""
    valid = accepted(entry)
    bad = [k for k in opts if k not in valid]
    if not bad:
        params = inspect.signature(entry).parameters
        for k, v in opts.items():
            why = _type_error(k, params[k].annotation, v)
            if why:
                raise DitDeployError(f"{backend} {kind}: {why}")
        return
    k = bad[0]
    near = difflib.get_close_matches(k, valid, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    more = f" (and {', '.join(repr(b) for b in bad[1:])})" if len(bad) > 1 else ""
    raise DitDeployError(f"unknown option {k!r} for the {backend} {kind}{hint}{more}; valid options: "
                         f"{', '.join(valid)}")


def parse_value(text: str) -> Any:
    """A ``key=value`` option value from the command line: int, float, true/false, none, else the string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text
