"""DiT checkpoints: read official and own files safely, infer/validate the architecture, save safetensors.

Accepted inputs (format detected from the content, not the suffix):

- the released official files (``DiT-XL-2-256x256.pt`` / ``-512x512.pt``): a bare state_dict;
- official ``train.py`` checkpoints ``{"model", "ema", "opt", "args"}`` (EMA weights preferred; ``args`` is an
  ``argparse.Namespace`` and gives a variant/image-size hint) and our own training checkpoints of the same shape;
- safetensors files whose metadata key ``"config"`` holds a ``DiTConfig`` JSON (what ``save_safetensors`` writes);
- a local diffusers DiT snapshot folder (``ditdeploy.sources.diffusers_snapshot``: mapped to the official names).

Pickles are only ever read with ``torch.load(..., weights_only=True)``; the single extra class allowed is
``argparse.Namespace`` (for ``train.py``'s ``args``), whose fields are themselves restricted to plain data. Any
other object in a pickle makes the load fail with an ``ArtifactError`` saying the file was refused as unsafe.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ditdeploy.artifact.files import atomic_path
from ditdeploy.config.variants import DIGITS, LATENT_CHANNELS, VARIANTS, DiTConfig, variant_config
from ditdeploy.errors import ArtifactError, DitDeployError, require

__all__ = ["infer_config", "load_model", "read_state_dict", "save_safetensors", "validate_against"]

_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers
_TRAIN_KEYS = ("ema", "model", "state_dict")  # preference order inside a training checkpoint
# hidden size -> attention heads: heads are not visible in the weights, so they come from the known configs.
_HEADS_BY_HIDDEN = {v["hidden_size"]: v["num_heads"] for v in VARIANTS.values()} | {DIGITS.hidden_size: DIGITS.num_heads}
_SHOW = 4  # how many keys to list in error messages


# ----------------------------------------------------------------------------------------------------------- read


def _sniff(path: Path, size: int) -> str:
    """'torch' (zip), 'pickle' (legacy torch / raw pickle), 'safetensors' or 'unknown', from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "torch"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) == 9 and head[8:9] == b"{":
        n = int.from_bytes(head[:8], "little")
        if 0 < n < (100 << 20):  # plausible JSON header length (truncation is reported by safetensors itself)
            return "safetensors"
    return "unknown"


def _torch_load(path: Path, kind: str) -> Any:
    if kind == "torch" and not zipfile.is_zipfile(path):
        raise ArtifactError(f"{path} is truncated or corrupt (its zip archive has no end record): download or save it again")
    try:
        # argparse.Namespace is what official train.py stores as "args"; its contents stay weights_only-restricted.
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's pickle-protocol notices are noise for users
            return torch.load(path, map_location="cpu", weights_only=True, mmap=(kind == "torch"))
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+) was not an allowed global", str(e))
        what = f"the Python object {m.group(1)}" if m else "pickle instructions that safe loading does not allow"
        raise ArtifactError(
            f"{path} was refused as unsafe: it contains {what}, and unpickling it could run code "
            "(only tensors are accepted; convert it to .safetensors where you trust it)"
        ) from e
    except Exception as e:  # zip/pickle/storage errors of a damaged file
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise ArtifactError(
            f"{path} is corrupt or truncated ({type(e).__name__}: {reason}): download or save it again"
        ) from e


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    st = require("safetensors", "export", "reading .safetensors checkpoints")
    try:
        with st.safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:
        raise ArtifactError(f"{path} is a corrupt or truncated safetensors file ({e}): save or download it again") from e
    config = None
    if "config" in metadata:
        try:
            config = DiTConfig.from_json(metadata["config"])
        except (ValueError, TypeError, DitDeployError) as e:
            raise ArtifactError(f"{path} has an invalid 'config' in its safetensors metadata ({e})") from e
    return sd, {"format": "safetensors", "source": "safetensors", "metadata": metadata, "config": config}


def _args_dict(args: Any) -> dict[str, Any] | None:
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    if isinstance(args, Mapping):
        return dict(args)
    return None


def _hint_from_args(args: dict[str, Any] | None) -> DiTConfig | None:
    """A DiTConfig from official train.py args (``model="DiT-XL/2"``, ``image_size``, ``num_classes``), if possible."""
    if not args or not isinstance(args.get("model"), str):
        return None
    kw = {}
    if isinstance(args.get("num_classes"), int):
        kw["num_classes"] = args["num_classes"]
    try:
        return variant_config(args["model"], int(args.get("image_size") or 256), **kw)
    except (DitDeployError, TypeError, ValueError):
        return None


def _config_from_obj(obj: Any) -> DiTConfig | None:
    try:
        if isinstance(obj, str):
            return DiTConfig.from_json(obj)
        if isinstance(obj, Mapping):
            return DiTConfig.from_dict(dict(obj))
    except (ValueError, TypeError, DitDeployError):
        return None
    return None


def _strip_prefixes(sd: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Remove ``module.`` / ``_orig_mod.`` prefixes shared by every key (repeatedly, e.g. both)."""
    sd, stripped = dict(sd), []
    changed = True
    while changed and sd:
        changed = False
        for p in _PREFIXES:
            if all(isinstance(k, str) and k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                stripped.append(p)
                changed = True
    return sd, stripped


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read the weights of a DiT checkpoint file: ``(state_dict, info)``.

    ``info`` holds ``format`` ("torch"|"pickle"|"safetensors"), ``source`` (which entry was used: "ema", "model",
    "state_dict" for a bare file, "safetensors"), ``config`` (a ``DiTConfig`` from safetensors metadata or a training
    checkpoint's ``config`` entry, else None), ``hint`` (a ``DiTConfig`` guessed from official ``args``, else None),
    ``args`` (train.py args as a dict, else None), ``metadata`` (safetensors metadata) and ``prefix_stripped``.
    Every failure is a one-line ``ArtifactError``.
    """
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"checkpoint {path} does not exist: check the path")
    if path.is_dir():
        from ditdeploy.sources import diffusers_snapshot

        if diffusers_snapshot.is_snapshot_dir(path):
            return diffusers_snapshot.read_official_state_dict(path, read_state_dict, infer_config)
        raise ArtifactError(f"checkpoint {path} is a directory but not a diffusers DiT snapshot (no model_index.json "
                            "or transformer config.json): pass the snapshot folder or a .pt/.safetensors file")
    size = path.stat().st_size
    if size == 0:
        raise ArtifactError(f"checkpoint {path} is empty (0 bytes): the save or download was interrupted; redo it")
    kind = _sniff(path, size)
    info: dict[str, Any] = {"format": kind, "config": None, "hint": None, "args": None, "metadata": {}}
    if kind == "safetensors":
        sd, extra = _read_safetensors(path)
        info.update(extra)
    elif kind in ("torch", "pickle"):
        obj = _torch_load(path, kind)
        if not isinstance(obj, Mapping):
            raise ArtifactError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors: not a DiT checkpoint")
        source = next((k for k in _TRAIN_KEYS if isinstance(obj.get(k), Mapping)), None)
        if source is not None:  # training checkpoint {"model", "ema", "opt", "args", ...}
            sd = obj[source]
            info["args"] = _args_dict(obj.get("args"))
            info["hint"] = _hint_from_args(info["args"])
            info["config"] = _config_from_obj(obj.get("config"))
        else:
            sd, source = obj, "state_dict"
        info["source"] = source
    else:
        suffix = f" (suffix {path.suffix})" if path.suffix else ""
        raise ArtifactError(
            f"{path} is not a PyTorch or safetensors checkpoint{suffix}: unrecognised content; "
            "pass a DiT .pt/.pth or .safetensors file"
        )
    sd, info["prefix_stripped"] = _strip_prefixes(sd)
    if not sd:
        raise ArtifactError(f"{path} contains no tensors: not a DiT checkpoint")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ArtifactError(
            f"{path} is not a state dict: {len(bad)} entries are not tensors (e.g. {bad[0]!r}: "
            f"{type(sd[bad[0]]).__name__})"
        )
    return sd, info


# ------------------------------------------------------------------------------------------------ infer/validate


def _need(sd: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise ArtifactError(f"not a DiT state dict: it has no {key!r} (keys start with {_few(list(sd))})")
    return sd[key]


def _few(keys: list[str], n: int = _SHOW) -> str:
    s = ", ".join(keys[:n])
    return s + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def infer_config(state_dict: Mapping[str, torch.Tensor], hint: DiTConfig | None = None) -> DiTConfig:
    """Derive the ``DiTConfig`` of a DiT state dict from its tensor names and shapes.

    Read from the weights: patch size, in/out channels (learn_sigma), hidden size, depth, mlp ratio, input size
    (pos_embed tokens x patch), number of classes (label-table rows minus the null row) and the conditioning design
    (adaLN 6h = adaLN-Zero, 4h = adaLN, cross-attention keys, neither = in-context). Not visible in the weights and
    taken from ``hint`` (when its hidden size matches) or the known variants: attention heads; from ``hint`` only:
    ``class_dropout_prob == 0`` (table without a null row) and ``space``. ``variant`` is the matching name
    ("XL/2", "digits") or the hint's, else "custom".
    """
    return _infer(state_dict, hint, need_heads=True)


def _infer(state_dict: Mapping[str, torch.Tensor], hint: DiTConfig | None, need_heads: bool) -> DiTConfig:
    """``infer_config``; with ``need_heads=False`` unknown heads become 1 (a valid placeholder, only for comparing/
    describing: heads are not visible in the weights and `_arch(..., heads=False)` leaves them out)."""
    w = _need(state_dict, "x_embedder.proj.weight")
    if w.ndim != 4 or w.shape[2] != w.shape[3]:
        raise ArtifactError(f"x_embedder.proj.weight has shape {tuple(w.shape)}, not (hidden, C, p, p): not a DiT")
    hidden, in_ch, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    idx = [int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))]
    if not idx:
        raise ArtifactError("not a DiT state dict: it has no transformer blocks (blocks.N.*)")
    depth = max(idx) + 1
    pos = state_dict.get("pos_embed")
    if pos is not None:
        tokens = int(pos.shape[-2])
        grid = math.isqrt(tokens)
        if grid * grid != tokens:
            raise ArtifactError(f"pos_embed has {tokens} tokens, not a square grid: not a DiT state dict")
        input_size = grid * patch
    elif hint is not None:
        input_size = hint.input_size
    else:
        raise ArtifactError("the state dict has no pos_embed, so its input size is unknown: pass --image-size/--model")
    rows = int(_need(state_dict, "y_embedder.embedding_table.weight").shape[0])
    if hint is not None and hint.class_dropout_prob == 0:
        num_classes, dropout = rows, 0.0
    else:
        num_classes, dropout = rows - 1, (hint.class_dropout_prob if hint is not None else 0.1)
    out_rows = int(_need(state_dict, "final_layer.linear.weight").shape[0])
    if out_rows % (patch * patch):
        raise ArtifactError(f"final_layer.linear has {out_rows} outputs, not a multiple of patch {patch}^2")
    out_ch = out_rows // (patch * patch)
    if out_ch == 2 * in_ch:
        learn_sigma = True
    elif out_ch == in_ch:
        learn_sigma = False
    else:
        raise ArtifactError(f"the model outputs {out_ch} channels for {in_ch} input channels: not a DiT")
    mlp_ratio = int(_need(state_dict, "blocks.0.mlp.fc1.weight").shape[0]) / hidden
    ada = state_dict.get("blocks.0.adaLN_modulation.1.weight")
    if ada is not None:
        n_mod = int(ada.shape[0]) // hidden
        conditioning = {6: "adaln-zero", 4: "adaln"}.get(n_mod)
        if conditioning is None:
            raise ArtifactError(f"blocks.0.adaLN_modulation regresses {n_mod}x hidden values (expected 6 or 4)")
    elif "blocks.0.cross_attn.q.weight" in state_dict:
        conditioning = "cross-attn"
    else:
        conditioning = "in-context"
    if hint is not None and hint.hidden_size == hidden:
        heads = hint.num_heads
    elif hidden in _HEADS_BY_HIDDEN:
        heads = _HEADS_BY_HIDDEN[hidden]
    elif not need_heads:
        heads = 1
    else:
        raise ArtifactError(
            f"cannot tell the number of attention heads of a DiT with hidden size {hidden}: use a .safetensors "
            "checkpoint with its config, or pass --model"
        )
    if hint is not None and hint.in_channels == in_ch:
        space = hint.space
    else:
        space = "latent" if in_ch == LATENT_CHANNELS else "pixel"
    cfg = DiTConfig(
        input_size=input_size, patch_size=patch, in_channels=in_ch, hidden_size=hidden, depth=depth,
        num_heads=heads, mlp_ratio=mlp_ratio, class_dropout_prob=dropout, num_classes=num_classes,
        learn_sigma=learn_sigma, conditioning=conditioning, variant="custom", space=space,
    )
    return dataclasses.replace(cfg, variant=_variant_name(cfg, hint))


def _arch(cfg: DiTConfig, heads: bool = True) -> tuple:
    """Architecture fields (heads optional: they are not visible in the weights)."""
    a = (cfg.depth, cfg.hidden_size, cfg.patch_size, cfg.in_channels, cfg.mlp_ratio)
    return (*a, cfg.num_heads) if heads else a


def _variant_name(cfg: DiTConfig, hint: DiTConfig | None) -> str:
    if dataclasses.replace(cfg, variant=DIGITS.variant) == DIGITS:
        return DIGITS.variant
    if cfg.in_channels == LATENT_CHANNELS and cfg.mlp_ratio == 4.0 and cfg.space == "latent":
        arch = {"depth": cfg.depth, "hidden_size": cfg.hidden_size, "num_heads": cfg.num_heads,
                "patch_size": cfg.patch_size}
        for name, v in VARIANTS.items():
            if v == arch:
                return name
    if hint is not None and _arch(hint) == _arch(cfg):
        return hint.variant
    return "custom"


def _describe(cfg: DiTConfig) -> str:
    name = f"DiT-{cfg.variant}" if cfg.variant in VARIANTS else (cfg.variant if cfg.variant != "custom" else "a DiT")
    return f"{name} at {cfg.image_size}px"


def _param_shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    from ditdeploy.models import DiT

    with torch.device("meta"):
        model = DiT(**config.model_kwargs())
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def validate_against(config: DiTConfig, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise a one-line ``ArtifactError`` when ``state_dict`` is not a checkpoint of the model ``config`` describes.

    Names what mismatches (variant/size/classes/output channels/conditioning) and how to fix it, e.g.
    "checkpoint is DiT-B/4 at 256px (hidden 768, patch 4, depth 12), not XL/2: pass --model B/4", then checks
    every parameter name and shape (first few missing/unexpected keys listed).
    """
    found = _infer(state_dict, config, need_heads=False)
    want_name = config.variant if config.variant != "custom" else "the requested config"
    problems = []
    if _arch(found, heads=False) != _arch(config, heads=False):
        found = _infer(state_dict, None, need_heads=False)  # describe it on its own terms
        fix = f": pass --model {found.variant}" if found.variant in VARIANTS or found.variant == DIGITS.variant else ""
        problems.append(
            f"checkpoint is {_describe(found)} (hidden {found.hidden_size}, patch {found.patch_size}, depth "
            f"{found.depth}, in_channels {found.in_channels}), not {want_name}{fix}"
        )
    elif found.input_size != config.input_size:
        tokens = (found.input_size // found.patch_size) ** 2
        problems.append(
            f"checkpoint is {_describe(found)} ({tokens} position tokens), not {config.image_size}px: "
            f"pass --image-size {found.image_size}"
        )
    if found.num_classes != config.num_classes:
        rows = found.num_classes + (1 if found.class_dropout_prob > 0 else 0)
        problems.append(f"checkpoint has {found.num_classes} classes ({rows} label-table rows), not {config.num_classes}")
    if found.learn_sigma != config.learn_sigma:
        problems.append(
            f"checkpoint outputs {found.out_channels} channels (learn_sigma={found.learn_sigma}), "
            f"not {config.out_channels}"
        )
    if found.conditioning != config.conditioning:
        problems.append(f"checkpoint uses {found.conditioning} conditioning, not {config.conditioning}")
    if problems:
        raise ArtifactError("; ".join(problems))
    expected = _param_shapes(config)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {s}" for k, s in expected.items()
             if k in state_dict and tuple(state_dict[k].shape) != s]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        if wrong:
            parts.append(f"wrong shapes {_few(wrong, 2)}")
        raise ArtifactError(f"checkpoint does not match {_describe(config)}: " + "; ".join(parts))


# ------------------------------------------------------------------------------------------------------ load/save


def _expected_config(name: str, image_size: int | None, found: DiTConfig) -> DiTConfig:
    """The config a variant name stands for; the name pins the architecture, the checkpoint the rest."""
    if name.lower() == DIGITS.variant:
        return variant_config(name)
    kw = {"num_classes": found.num_classes, "learn_sigma": found.learn_sigma, "conditioning": found.conditioning,
          "class_dropout_prob": found.class_dropout_prob}
    px = image_size or (found.image_size if found.space == "latent" else None)
    try:
        return variant_config(name, px or 256, **kw)
    except DitDeployError:
        if image_size is not None:
            raise
        return variant_config(name, 256, **kw)  # the size is wrong anyway; let validation name the real mismatch


def load_model(
    path: str | os.PathLike, model: str | DiTConfig | None = None, image_size: int | None = None
) -> nn.Module:
    """Load a checkpoint into a ``ditdeploy.models.DiT`` (fp32, eval mode, strict parameter names).

    ``model`` (a variant name such as "XL/2" or "digits", or a ``DiTConfig``) and ``image_size`` state what the
    caller expects; a checkpoint of anything else is refused with a one-line ``ArtifactError`` naming the mismatch.
    Without them the config comes from safetensors metadata, else from the tensor shapes (``infer_config``).
    ``model.config`` of the result is that ``DiTConfig``.
    """
    from ditdeploy.models import DiT

    sd, info = read_state_dict(path)
    stored: DiTConfig | None = info.get("config")
    hint = stored or info.get("hint")
    try:
        if isinstance(model, DiTConfig):
            cfg = model
        elif model:
            cfg = _expected_config(model, image_size, _infer(sd, hint, need_heads=False))
        else:
            cfg = stored or infer_config(sd, hint)
        validate_against(cfg, sd)
    except ArtifactError as e:
        raise ArtifactError(f"{Path(path).name}: {e}") from e
    if image_size is not None and cfg.image_size != image_size:
        raise ArtifactError(
            f"{Path(path).name}: checkpoint is {_describe(cfg)}, not {image_size}px: pass --image-size {cfg.image_size}"
        )
    with torch.device("meta"):  # skip the random init (seconds for XL/2): every tensor is loaded strictly below
        net = DiT(**cfg.model_kwargs())
    # Adopt the loaded fp32 tensors as the parameters (no second copy: peak memory ~1x the weights); other dtypes
    # are copied into fp32. Only complete when the model has no buffers (a non-persistent one would stay unset).
    adopt = all(v.dtype == torch.float32 and v.is_contiguous() for v in sd.values())
    if any(True for _ in net.buffers()):
        net, adopt = DiT(**cfg.model_kwargs()), False
    elif not adopt:
        net = net.to_empty(device="cpu")
    try:
        net.load_state_dict(sd, strict=True, assign=adopt)
    except RuntimeError as e:  # pragma: no cover - validate_against checks names and shapes first
        raise ArtifactError(f"{Path(path).name}: {str(e).splitlines()[0]}") from e
    net.config = cfg
    return net.eval()


def save_safetensors(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    config: DiTConfig,
    extra_metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write weights to ``path`` (.safetensors) atomically with ``config`` JSON in metadata key "config".

    The weights are checked against ``config`` first (``validate_against``), so a file never carries a config that
    does not describe it. ``extra_metadata`` values that are not strings are stored as JSON.
    """
    st_torch = require("safetensors.torch", "export", "writing .safetensors checkpoints")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise DitDeployError(f"{path} must end in .safetensors")
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    sd, _ = _strip_prefixes(sd)
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise DitDeployError(f"cannot save a state dict with non-tensor entries (e.g. {bad[0]!r})")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    validate_against(config, tensors)
    metadata = {"config": config.to_json(), "format": "pt"}
    for k, v in (extra_metadata or {}).items():
        if k in metadata:
            raise DitDeployError(f"metadata key {k!r} is reserved")
        metadata[str(k)] = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    with atomic_path(path, suffix=".safetensors") as tmp:
        st_torch.save_file(tensors, str(tmp), metadata=metadata)
    return path
