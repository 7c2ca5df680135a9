"""Recipe files: what ``ditdeploy tune`` found fastest within its quality budget on one machine.

A recipe is in a form ``ditdeploy sample --recipe`` (and any :class:`ditdeploy.run.generation.SampleRequest`
caller) applies.

A recipe is strict JSON (``kind: "ditdeploy-recipe"``): the artifact (path relative to the recipe file, and
the sha256 of its main file), the backend and its options (threads, OpenVINO precision hint), the less-work
settings (guidance interval, feature-reuse interval), the workload it was tuned for (sampler, steps, cfg
scale), what was measured (speed and quality price) against which budget, and the machine (CPU, ISA flags,
load).

:func:`apply_recipe` fills the request's fields that the caller left unset (None); anything set explicitly
wins. Stdlib only at import time.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KIND = "ditdeploy-recipe"
VERSION = 1
RECIPE_OPTIONS = ("threads", "precision_hint")  # backend options a recipe may set

__all__ = ["KIND", "Recipe", "apply_recipe", "load_recipe", "save_recipe"]


@dataclass
class Recipe:
    """One tuned deployment recipe (see module docstring)."""

    engine: str  # relative to the recipe file's folder (or absolute)
    engine_sha256: str
    backend: str
    options: dict[str, Any] = field(default_factory=dict)
    cfg_interval: list[int] | None = None
    cache_interval: int | None = None
    tuned_for: dict[str, Any] = field(default_factory=dict)  # sampler, steps, cfg_scale, images
    measured: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    name: str = ""

    def engine_path(self, recipe_path: str | os.PathLike) -> Path:
        p = Path(self.engine)
        return p if p.is_absolute() else Path(recipe_path).parent / p


def save_recipe(path: str | os.PathLike, recipe: Recipe) -> Path:
    """Write ``recipe`` as JSON at ``path`` (atomically, through the output policy)."""
    from ditdeploy.artifact.files import write_json_atomic
    from ditdeploy.artifact.output_policy import check_outputs
    from ditdeploy.errors import DitDeployError

    path = Path(path)
    if path.suffix.lower() != ".json":
        raise DitDeployError(f"the recipe is a JSON file: {path.name} should end in .json")
    check_outputs({"--engine": recipe.engine_path(path)}, {"--out": path})
    write_json_atomic(path, {"kind": KIND, "version": VERSION, **dataclasses.asdict(recipe)})
    return path


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and check a recipe file; one-line DitDeployError for anything malformed."""
    from ditdeploy.errors import DitDeployError

    path = Path(path)
    if not path.is_file():
        raise DitDeployError(f"no such recipe file: {path}")
    if path.stat().st_size > 1 << 20:
        raise DitDeployError(f"{path.name} is larger than 1 MiB: not a recipe file")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise DitDeployError(f"{path.name} is not a valid recipe file ({type(e).__name__}: {e})") from e
    if not isinstance(raw, dict) or raw.get("kind") != KIND:
        raise DitDeployError(f"{path.name} is not a ditdeploy recipe (kind != {KIND!r}); write one with "
                             "`ditdeploy tune`")
    if raw.get("version") != VERSION:
        raise DitDeployError(f"{path.name} is recipe version {raw.get('version')!r}; this ditdeploy reads {VERSION}")
    names = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(raw) - names - {"kind", "version"})
    if unknown:
        raise DitDeployError(f"{path.name} has unknown recipe field(s) {', '.join(unknown)}")
    try:
        r = Recipe(**{k: v for k, v in raw.items() if k in names})
    except TypeError as e:
        raise DitDeployError(f"{path.name} lacks a recipe field ({e})") from e
    _check(r, path.name)
    return r


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _check(r: Recipe, name: str) -> None:
    from ditdeploy.errors import DitDeployError

    problems = [
        (not isinstance(r.engine, str) or not r.engine, "engine must be a path"),
        (not isinstance(r.engine_sha256, str) or len(r.engine_sha256) != 64, "engine_sha256 must be a sha256"),
        (not isinstance(r.backend, str), "backend must be a name"),
        (not isinstance(r.options, dict) or bool(set(r.options) - set(RECIPE_OPTIONS)),
         f"options may set only {', '.join(RECIPE_OPTIONS)}"),
        (r.cfg_interval is not None and (not isinstance(r.cfg_interval, list) or len(r.cfg_interval) != 2
                                         or not all(isinstance(v, int) for v in r.cfg_interval)),
         "cfg_interval must be [lo, hi] or null"),
        (r.cache_interval is not None and (not isinstance(r.cache_interval, int) or r.cache_interval < 1),
         "cache_interval must be an integer >= 1 or null"),
    ]
    for bad, what in problems:
        if bad:
            raise DitDeployError(f"recipe {name}: {what}")


def apply_recipe(req: Any, path: str | os.PathLike, say: Any = None) -> Any:
    """A copy of ``req`` with the recipe at ``path`` filling every field left unset (None).

    ``req`` is a :class:`ditdeploy.run.generation.SampleRequest` (engine, backend, threads, precision hint, guidance
    interval, cache interval) or any dataclass with some of those fields, such as ``ditdeploy serve``'s
    ``ServeOptions`` (engine, backend, options: the less-work settings travel with each request, e.g.
    ``sample --server URL --recipe FILE``). A request to a server (``server`` set) takes only the less-work
    settings: the server chose its artifact. The recipe's artifact must be the one it was tuned on (sha256 of its
    main file). ``say`` gets a note when the run's sampler/steps differ from the workload tuned for."""
    from ditdeploy.artifact.files import sha256_file
    from ditdeploy.errors import DitDeployError

    r = load_recipe(path)
    names = {f.name for f in dataclasses.fields(req)}
    change: dict[str, Any] = {}
    if "engine" in names and getattr(req, "server", None) is None:
        if req.engine is None:
            engine = r.engine_path(path)
            if not engine.is_file():
                raise DitDeployError(f"recipe {Path(path).name}: its artifact {engine} is missing")
            if sha256_file(engine) != r.engine_sha256:
                raise DitDeployError(f"recipe {Path(path).name}: {engine.name} is not the artifact it was tuned on "
                                     "(sha256 differs); run `ditdeploy tune` again")
            change["engine"] = engine
        change["backend"] = req.backend if req.backend is not None else r.backend
        change["options"] = {**{k: v for k, v in r.options.items()},
                             **{k: v for k, v in req.options.items() if v is not None}}
    for k in ("cfg_interval", "cache_interval"):
        if k in names and getattr(req, k) is None:
            change[k] = getattr(r, k)
    tf = r.tuned_for
    if say is not None and tf and "steps" in names and (tf.get("sampler"), tf.get("steps")) != (req.sampler,
                                                                                                  req.steps):
        say(f"note: recipe {Path(path).name} was tuned for {tf.get('sampler')} {tf.get('steps')} steps; this run "
            f"is {req.sampler} {req.steps} (its speed-up was measured for the former)")
    return dataclasses.replace(req, **change)
