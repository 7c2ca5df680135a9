"""diffusers DiT snapshots <-> ditdeploy's official-layout DiT: locate, read, map, write.

A snapshot is the folder ``DiTPipeline.save_pretrained`` writes (the ``facebook/DiT-XL-2-256`` layout):
``model_index.json`` (with ``id2label``), ``transformer/`` (``config.json`` + ``diffusion_pytorch_model``
``.safetensors``/``.bin``, possibly sharded with an ``.index.json``), ``vae/``, ``scheduler/``. ``--checkpoint`` may
name the pipeline folder or its ``transformer/`` subfolder.

The mapping is the inverse of diffusers' published conversion (``scripts/convert_dit_to_diffusers.py`` plus the
``DiTTransformer2DModel`` module layout): diffusers splits the official fused ``qkv`` into ``to_q/to_k/to_v``, renames
``x_embedder`` -> ``pos_embed``, ``adaLN_modulation.1`` -> ``norm1.linear``, ``mlp.fc1/fc2`` -> ``ff.net.0.proj/2``,
the final layer -> ``proj_out_1/2``, and keeps one copy of the timestep/class embedders *per block*
(``transformer_blocks.i.norm1.emb``; the conversion copies the single official embedder into each). The fixed
sin-cos ``pos_embed`` is not stored by diffusers and is recomputed here. Every tensor is accounted for: unknown or
missing names, wrong shapes, or per-block embedders that differ (a model fine-tuned in diffusers, which one shared
embedder cannot represent) are one-line errors. See docs/diffusers.md for the numerics of the two forwards.

Pickled ``.bin`` files are read with ``torch.load(weights_only=True)`` only (via ``ditdeploy.sources.checkpoints``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ditdeploy.artifact.files import DIT_CLASSES, is_snapshot_dir
from ditdeploy.artifact.files import SNAPSHOT_INDEX as INDEX
from ditdeploy.config.labels import normalize
from ditdeploy.config.variants import DiTConfig
from ditdeploy.errors import ArtifactError, DitDeployError, require

if TYPE_CHECKING:  # torch is imported where tensors are handled: locating a snapshot stays torch-free
    import torch

__all__ = [
    "Snapshot", "diffusers_config", "from_official", "hub_id_error", "is_snapshot_dir", "locate",
    "looks_like_hub_id", "read_official_state_dict", "snapshot_digest", "to_official", "write_snapshot",
]

WEIGHTS = "diffusion_pytorch_model"
POS_EMBED_ATOL = 1e-5  # a stored pos_embed further than this from sin-cos was trained: diffusers cannot hold it
OFFICIAL_LN_EPS = 1e-6  # every LayerNorm of the official DiT; diffusers' MLP LayerNorm uses config norm_eps
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".onnx", ".json")
_EMB = "transformer_blocks.{i}.norm1.emb."
_T_EMB = {"t_embedder.mlp.0": "timestep_embedder.linear_1", "t_embedder.mlp.2": "timestep_embedder.linear_2"}
_BLOCK = {"attn.proj": "attn1.to_out.0", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2",
          "adaLN_modulation.1": "norm1.linear"}
_TOP = {"x_embedder.proj": "pos_embed.proj", "final_layer.adaLN_modulation.1": "proj_out_1",
        "final_layer.linear": "proj_out_2"}


@dataclass(frozen=True)
class Snapshot:
    """Where the parts of a local diffusers DiT snapshot are."""

    transformer: Path  # folder holding config.json + weights
    weight_files: tuple[Path, ...]
    root: Path | None = None  # the pipeline folder (model_index.json), if known
    vae: Path | None = None  # root/vae when it holds an AutoencoderKL config
    id2label: dict[int, str] | None = None


# ------------------------------------------------------------------------------------------------------ locate


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else " ".join(str(e).split())[:200]
        raise ArtifactError(f"{path} is not readable JSON ({why}): the snapshot is damaged; copy it again") from e
    if not isinstance(obj, dict):
        raise ArtifactError(f"{path} holds a {type(obj).__name__}, not a JSON object: not a diffusers snapshot")
    return obj


def looks_like_hub_id(spec: str) -> bool:
    """``owner/name`` with no such local path (e.g. ``facebook/DiT-XL-2-256``)."""
    if Path(spec).suffix.lower() in _FILE_SUFFIXES:  # runs/model.pt is a mistyped path, not a hub id
        return False
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", spec)) and not Path(spec).exists()


def hub_id_error(spec: str) -> ArtifactError:
    """The one-line error for a hub id: ditdeploy never downloads snapshots; where to put one."""
    name = spec.rstrip("/").split("/")[-1]
    return ArtifactError(
        f"--checkpoint {spec}: no such file or folder; if it is a Hugging Face hub id: ditdeploy does not download, on a machine "
        f"with network access run `huggingface-cli download {spec} --local-dir {name}`, copy the {name}/ folder "
        f"(model_index.json, transformer/, vae/) here and pass --checkpoint {name}/"
    )


def _find_weights(d: Path) -> tuple[Path, ...]:
    """The transformer's weight files: single or sharded safetensors, else single or sharded .bin."""
    for ext in (".safetensors", ".bin"):
        single = d / f"{WEIGHTS}{ext}"
        if single.is_file():
            return (single,)
        index = d / f"{WEIGHTS}{ext}.index.json"
        if index.is_file():
            wmap = _read_json(index).get("weight_map")
            if not isinstance(wmap, dict) or not wmap:
                raise ArtifactError(f"{index} has no 'weight_map': the snapshot is damaged; copy it again")
            shards = sorted({str(v) for v in wmap.values()})
            bad = [s for s in shards if "/" in s or "\\" in s or s.startswith(".")]
            if bad:
                raise ArtifactError(f"{index} names an unsafe shard path {bad[0]!r}")
            missing = [s for s in shards if not (d / s).is_file()]
            if missing:
                raise ArtifactError(f"{index.name} lists shard {missing[0]} which is missing in {d}: copy the "
                                    "complete snapshot")
            return tuple(d / s for s in shards)
    raise ArtifactError(f"{d} has no {WEIGHTS}.safetensors or .bin (sharded or not): copy the complete snapshot")


def locate(path: str | os.PathLike) -> Snapshot:
    """Find transformer config/weights, vae/ and id2label of a snapshot given as pipeline or transformer folder."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ArtifactError(f"{p} is not a folder: pass a diffusers DiT snapshot (model_index.json, transformer/)")
    root = p if (p / INDEX).is_file() else (p.parent if (p.parent / INDEX).is_file() else None)
    tdir = p / "transformer" if p == root else p
    if not (tdir / "config.json").is_file():
        raise ArtifactError(f"{tdir} has no config.json: pass a diffusers DiT snapshot (the pipeline folder or its "
                            "transformer/ subfolder)")
    id2label = None
    vae = None
    if root is not None:
        index = _read_json(root / INDEX)
        try:
            id2label = normalize(index.get("id2label"))
        except DitDeployError as e:
            raise ArtifactError(f"{root / INDEX}: {e}") from e
        if (root / "vae" / "config.json").is_file():
            vae = root / "vae"
    if root is not None and (root / MANIFEST_NAME).is_file():  # written by ditdeploy: verify what it recorded
        _verify_snapshot(root)
    return Snapshot(transformer=tdir, weight_files=_find_weights(tdir), root=root, vae=vae, id2label=id2label)


def _verify_snapshot(root: Path) -> None:
    """Every file a ditdeploy-written snapshot's manifest lists exists with its recorded sha256."""
    from ditdeploy.artifact.files import verify_folder

    verify_folder(root, MANIFEST_NAME)


def snapshot_digest(snap: Snapshot) -> str:
    """sha256 over the transformer's config.json and weight files (name + content sha256, sorted)."""
    from ditdeploy.artifact.files import sha256_file

    h = hashlib.sha256()
    for f in sorted([snap.transformer / "config.json", *snap.weight_files]):
        h.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------ config


def config_from_diffusers(cfg: Mapping[str, Any], where: str = "config.json") -> DiTConfig:
    """The official-architecture ``DiTConfig`` a ``DiTTransformer2DModel`` config describes (refusing others)."""
    cls = cfg.get("_class_name")
    if cls not in DIT_CLASSES:
        raise ArtifactError(f"{where}: _class_name {cls!r} is not a DiT transformer ({' or '.join(DIT_CLASSES)})")
    checks = {"norm_type": ("ada_norm_zero", None), "activation_fn": ("gelu-approximate", None),
              "norm_elementwise_affine": (False, None), "attention_bias": (True, None),
              "cross_attention_dim": (None,), "num_vector_embeds": (None,)}
    for key, ok in checks.items():
        if cfg.get(key) not in ok:
            raise ArtifactError(f"{where}: {key}={cfg.get(key)!r} is not the DiT architecture (expected "
                                f"{ok[0]!r}): ditdeploy reads class-conditional adaLN-Zero DiT transformers only")
    need = ("num_attention_heads", "attention_head_dim", "in_channels", "num_layers", "sample_size", "patch_size",
            "num_embeds_ada_norm")
    missing = [k for k in need if not isinstance(cfg.get(k), int) or isinstance(cfg.get(k), bool)]
    if missing:
        raise ArtifactError(f"{where}: {missing[0]} is missing or not an integer: not a DiT transformer config")
    heads, head_dim, c = cfg["num_attention_heads"], cfg["attention_head_dim"], cfg["in_channels"]
    out = cfg.get("out_channels") or c
    if isinstance(out, bool) or out not in (c, 2 * c):
        raise ArtifactError(f"{where}: out_channels {out} for in_channels {c}: not a DiT (expected {c} or {2 * c})")
    try:
        return DiTConfig(
            input_size=cfg["sample_size"], patch_size=cfg["patch_size"], in_channels=c, hidden_size=heads * head_dim,
            depth=cfg["num_layers"], num_heads=heads, mlp_ratio=4.0, class_dropout_prob=0.1,
            num_classes=cfg["num_embeds_ada_norm"], learn_sigma=out == 2 * c, variant="custom",
            space="latent" if c == 4 else "pixel",
        )
    except DitDeployError as e:
        raise ArtifactError(f"{where}: {e}") from e


def diffusers_config(cfg: DiTConfig) -> dict[str, Any]:
    """``DiTTransformer2DModel`` keyword arguments for ``cfg``; refuses what diffusers' DiT cannot express.

    ``norm_eps`` is the official 1e-6, so diffusers' MLP LayerNorm matches ours (its default is 1e-5).
    """
    if cfg.conditioning != "adaln-zero":
        raise DitDeployError(f"diffusers' DiTTransformer2DModel is adaLN-Zero only; this model is {cfg.conditioning}")
    if cfg.mlp_ratio != 4.0:
        raise DitDeployError(f"diffusers' DiTTransformer2DModel has a fixed MLP ratio 4; this model has {cfg.mlp_ratio}")
    if cfg.hidden_size % cfg.num_heads:
        raise DitDeployError(f"hidden size {cfg.hidden_size} is not divisible by {cfg.num_heads} heads")
    return {
        "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.hidden_size // cfg.num_heads,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "num_layers": cfg.depth,
        "sample_size": cfg.input_size, "patch_size": cfg.patch_size, "num_embeds_ada_norm": cfg.num_classes,
        "activation_fn": "gelu-approximate", "attention_bias": True, "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False, "norm_eps": OFFICIAL_LN_EPS, "dropout": 0.0, "upcast_attention": False,
    }


# ------------------------------------------------------------------------------------------------------ VAE

#: integer sizes of an AutoencoderKL config.json and the largest value each may take
_VAE_INTS = {"in_channels": 64, "out_channels": 64, "latent_channels": 256, "layers_per_block": 64,
             "norm_num_groups": 1 << 14, "sample_size": 1 << 16}
MAX_VAE_CHANNELS = 1 << 14


def _bad_int(v: Any, hi: int) -> bool:
    return not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= hi


def check_vae_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of an AutoencoderKL folder with its sizes checked (positive integers, bounded; groups
    dividing the channels; finite positive scaling factor) and its parameters' memory bounded, before diffusers
    builds anything. ArtifactError (one line) naming the file and the value."""
    from ditdeploy.system.bounds import check_memory

    where = Path(folder) / "config.json"
    cfg = _read_json(where)
    for k, hi in _VAE_INTS.items():
        if cfg.get(k) is not None and _bad_int(cfg[k], hi):
            raise ArtifactError(f"{where}: {k} must be an integer in 1..{hi}, got {cfg[k]!r}")
    ch = cfg.get("block_out_channels")
    if ch is not None and (not isinstance(ch, list) or not 1 <= len(ch) <= 16
                           or any(_bad_int(c, MAX_VAE_CHANNELS) for c in ch)):
        raise ArtifactError(f"{where}: block_out_channels must be a list of 1..16 integers in 1..{MAX_VAE_CHANNELS}, "
                            f"got {str(ch)[:80]}")
    groups = cfg.get("norm_num_groups") or 32
    if ch and any(c % groups for c in ch):
        raise ArtifactError(f"{where}: norm_num_groups {groups} does not divide block_out_channels {ch}")
    for k in ("scaling_factor", "shift_factor"):
        v = cfg.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                              or (k == "scaling_factor" and v <= 0)):
            raise ArtifactError(f"{where}: {k} must be a finite{' positive' * (k == 'scaling_factor')} number, "
                                f"got {v!r}")
    if ch:  # encoder + decoder: ~(2 layers + 3) 3x3 convolutions of c x c per level each (SD VAE: 76M of 84M)
        n = 2 * sum((2 * (cfg.get("layers_per_block") or 1) + 3) * 9 * c * c for c in ch)
        check_memory(n, 4, f"the ~{n:,} fp32 parameters of the AutoencoderKL in {where}",
                     "check its block_out_channels / layers_per_block")
    return cfg


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """diffusers' notices (``accelerate`` not installed, ``vae=None``, deprecations) and library warnings off while
    it reads or writes: noise on a CLI whose own one-line errors say what matters."""
    import warnings

    log = require_diffusers("reading diffusers folders").utils.logging
    level = log.get_verbosity()
    log.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.set_verbosity(level)


def load_vae(vae_dir: str | os.PathLike) -> Any:
    """``AutoencoderKL.from_pretrained(vae_dir)`` (local files only) with a one-line error when that fails."""
    require("diffusers", "vae", "VAE decoder export")
    d = Path(vae_dir)
    if not d.exists():
        raise ArtifactError(f"VAE directory {d} does not exist: pass the folder holding config.json and the weights")
    if d.is_file() or not (d / "config.json").exists():
        sub = d / "vae"
        if sub.is_dir() and (sub / "config.json").exists():
            d = sub  # a full pipeline folder: use its vae/ subfolder
        else:
            raise ArtifactError(f"{d} is not a diffusers AutoencoderKL folder (no config.json): e.g. a local "
                                "copy of stabilityai/sd-vae-ft-ema")
    return load_autoencoder(d).float().eval()


def load_autoencoder(folder: str | os.PathLike, **kwargs: Any) -> Any:
    """``AutoencoderKL.from_pretrained(folder)`` (local files only) after :func:`check_vae_config`, quietly; any
    failure of diffusers is one ArtifactError line."""
    from ditdeploy.errors import raise_if_interrupted

    diffusers = require_diffusers("loading the VAE")
    d = Path(folder)
    check_vae_config(d)
    with quiet_diffusers():
        try:
            return diffusers.AutoencoderKL.from_pretrained(str(d), local_files_only=True, **kwargs)
        except Exception as e:  # diffusers raises OSError/ValueError/EnvironmentError variants
            raise_if_interrupted(e)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ArtifactError(f"cannot load a diffusers AutoencoderKL from {d}: {first}") from e


# ------------------------------------------------------------------------------------------------------ mapping


def _pop(sd: dict[str, torch.Tensor], key: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    if key not in sd:
        raise ArtifactError(f"the transformer weights have no {key!r}: incomplete or not a DiT snapshot")
    v = sd.pop(key)
    if shape is not None and tuple(v.shape) != shape:
        raise ArtifactError(f"{key} has shape {tuple(v.shape)}, the config implies {shape}: weights and "
                            "config.json do not belong together")
    return v


def _pos_embed(cfg: DiTConfig) -> torch.Tensor:
    import torch

    from ditdeploy.models import get_2d_sincos_pos_embed

    grid = cfg.input_size // cfg.patch_size
    return torch.from_numpy(get_2d_sincos_pos_embed(cfg.hidden_size, grid)).float().unsqueeze(0)


def pos_embed_deviation(sd: Mapping[str, torch.Tensor], cfg: DiTConfig) -> float:
    """Max |stored pos_embed - the fixed sin-cos table diffusers recomputes| (float32 rounding: ~1e-6)."""

    return float((sd["pos_embed"].detach().float().cpu() - _pos_embed(cfg)).abs().max())


def _take_embedders(d: dict[str, torch.Tensor], cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """Block 0's timestep/class embedders as the official ones; every other block's copy must equal them."""
    import torch

    h = cfg.hidden_size
    shapes = {"timestep_embedder.linear_1.weight": (h, 256), "timestep_embedder.linear_1.bias": (h,),
              "timestep_embedder.linear_2.weight": (h, h), "timestep_embedder.linear_2.bias": (h,),
              "class_embedder.embedding_table.weight": (cfg.num_classes + 1, h)}
    first = {k: _pop(d, _EMB.format(i=0) + k, s) for k, s in shapes.items()}
    for i in range(1, cfg.depth):
        for k in shapes:
            if not torch.equal(_pop(d, _EMB.format(i=i) + k, shapes[k]), first[k]):
                raise ArtifactError(
                    f"transformer_blocks.{i}.norm1.emb.{k} differs from block 0's: this diffusers model has per-block "
                    "timestep/class embedders, which the official DiT (one shared embedder) cannot represent exactly"
                )
    out = {f"{o}.{wb}": first[f"{n}.{wb}"] for o, n in _T_EMB.items() for wb in ("weight", "bias")}
    out["y_embedder.embedding_table.weight"] = first["class_embedder.embedding_table.weight"]
    return out


def to_official(diffusers_sd: Mapping[str, torch.Tensor], cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """Official DiT state dict (fp32) from a ``DiTTransformer2DModel`` state dict; every tensor must be used."""
    import torch

    d = {k: v for k, v in diffusers_sd.items()}
    h, p, c = cfg.hidden_size, cfg.patch_size, cfg.in_channels
    mlp = int(h * cfg.mlp_ratio)
    out: dict[str, torch.Tensor] = {"pos_embed": _pos_embed(cfg)}
    d.pop("pos_embed.pos_embed", None)  # only stored by some diffusers versions; it is the same fixed sin-cos table
    out["x_embedder.proj.weight"] = _pop(d, "pos_embed.proj.weight", (h, c, p, p))
    out["x_embedder.proj.bias"] = _pop(d, "pos_embed.proj.bias", (h,))
    out.update(_take_embedders(d, cfg))
    shapes = {"attn.proj": (h, h), "mlp.fc1": (mlp, h), "mlp.fc2": (h, mlp), "adaLN_modulation.1": (6 * h, h)}
    for i in range(cfg.depth):
        b = f"transformer_blocks.{i}."
        for wb in ("weight", "bias"):
            q, k, v = (_pop(d, f"{b}attn1.to_{n}.{wb}", (h, h) if wb == "weight" else (h,)) for n in "qkv")
            out[f"blocks.{i}.attn.qkv.{wb}"] = torch.cat([q, k, v], 0)
            for o, n in _BLOCK.items():
                s = shapes[o] if wb == "weight" else (shapes[o][0],)
                out[f"blocks.{i}.{o}.{wb}"] = _pop(d, f"{b}{n}.{wb}", s)
    final = {"final_layer.adaLN_modulation.1": (2 * h, h), "final_layer.linear": (p * p * cfg.out_channels, h)}
    for o, s in final.items():
        for wb in ("weight", "bias"):
            out[f"{o}.{wb}"] = _pop(d, f"{_TOP[o]}.{wb}", s if wb == "weight" else (s[0],))
    if d:
        extra = sorted(d)
        raise ArtifactError(f"the transformer weights hold {len(extra)} tensor(s) a DiT does not have (e.g. "
                            f"{extra[0]!r}): config.json and weights do not belong together")
    return {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}


def from_official(sd: Mapping[str, torch.Tensor], cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """``DiTTransformer2DModel`` state dict from an official one (embedders copied into every block).

    A model without a null class row (``class_dropout_prob == 0``) gets a zero row appended: diffusers' label table
    always has ``num_classes + 1`` rows; the extra row is only read for guidance, which such a model never uses.
    """
    import torch

    dev = pos_embed_deviation(sd, cfg)
    if dev > POS_EMBED_ATOL:
        raise DitDeployError(f"this model's pos_embed differs from the fixed sin-cos table by up to {dev:.2e}: "
                             "diffusers recomputes that table, so it cannot be written as a diffusers snapshot")
    out: dict[str, torch.Tensor] = {}
    for o, n in _TOP.items():
        for wb in ("weight", "bias"):
            out[f"{n}.{wb}"] = sd[f"{o}.{wb}"]
    table = sd["y_embedder.embedding_table.weight"]
    if table.shape[0] == cfg.num_classes:
        table = torch.cat([table, table.new_zeros(1, table.shape[1])], 0)
    emb = {f"{n}.{wb}": sd[f"{o}.{wb}"] for o, n in _T_EMB.items() for wb in ("weight", "bias")}
    emb["class_embedder.embedding_table.weight"] = table
    for i in range(cfg.depth):
        b = f"transformer_blocks.{i}."
        out.update({_EMB.format(i=i) + k: v for k, v in emb.items()})
        for wb in ("weight", "bias"):
            for n, part in zip("qkv", sd[f"blocks.{i}.attn.qkv.{wb}"].chunk(3, 0), strict=True):
                out[f"{b}attn1.to_{n}.{wb}"] = part
            for o, n in _BLOCK.items():
                out[f"{b}{n}.{wb}"] = sd[f"blocks.{i}.{o}.{wb}"]
    return out


# ------------------------------------------------------------------------------------------------------ read


def read_official_state_dict(path: str | os.PathLike, read_file: Any, infer_config: Any
                             ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(official state dict, info)`` of a snapshot folder; ``info`` as ``checkpoints.read_state_dict`` plus
    ``snapshot`` (the ``Snapshot``), ``id2label`` and ``dtype`` (of the stored weights). ``read_file`` /
    ``infer_config``: ``checkpoints.read_state_dict`` / ``checkpoints.infer_config`` (passed in by
    ``checkpoints``, the only caller: this module does not import it back)."""

    snap = locate(path)
    cfg_path = snap.transformer / "config.json"
    hint = config_from_diffusers(_read_json(cfg_path), str(cfg_path))
    from ditdeploy.system.bounds import check_model

    check_model(hint, f"the DiT {cfg_path} describes")  # before any tensor (or the sin-cos table) is allocated
    raw: dict[str, torch.Tensor] = {}
    for f in snap.weight_files:
        part, _ = read_file(f)
        dup = set(part) & set(raw)
        if dup:
            raise ArtifactError(f"{f.name} repeats tensor {sorted(dup)[0]!r} of another shard: the snapshot is damaged")
        raw.update(part)
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in raw.values()})
    try:
        sd = to_official(raw, hint)
        cfg = infer_config(sd, hint)  # also names the variant ("XL/2") when the architecture is an official one
    except ArtifactError as e:
        raise ArtifactError(f"{snap.transformer}: {e}") from e
    if snap.id2label and max(snap.id2label) >= cfg.num_classes:
        raise ArtifactError(f"{snap.root / INDEX}: id2label names class {max(snap.id2label)}, but the model has "
                            f"{cfg.num_classes} classes")
    info = {"format": "diffusers", "source": "diffusers", "config": cfg, "hint": None, "args": None, "metadata": {},
            "prefix_stripped": [], "snapshot": snap, "id2label": snap.id2label, "dtype": ",".join(dtypes)}
    return sd, info


# ------------------------------------------------------------------------------------------------------ write

MANIFEST_NAME = "ditdeploy_manifest.json"  # inside the written snapshot; diffusers ignores unknown files


def _scheduler(diffusers: Any) -> Any:
    """DDIM over the official 1000-step linear schedule (1e-4..0.02), no x0 clipping (DiT's sample.py)."""
    return diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                   beta_schedule="linear", clip_sample=False)


def _written_parity(net: Any, folder: Path, seed: int) -> dict[str, Any]:
    """Re-read the written transformer: weights must map back bit-exactly; its forward difference vs ours on one probe
    per timestep (``parity.compare_runs``) recorded."""
    import torch

    from ditdeploy.export.verify import torch_reference
    from ditdeploy.proof.parity import compare_runs

    diffusers = require_diffusers("checking the written snapshot")
    with quiet_diffusers():
        tr = diffusers.DiTTransformer2DModel.from_pretrained(str(folder / "transformer"), local_files_only=True)
    tr = tr.eval()
    cfg = net.config
    back = to_official(tr.state_dict(), cfg)
    own = {k: v.detach().float() for k, v in net.state_dict().items()}
    if cfg.class_dropout_prob == 0:  # the zero null row appended for diffusers is not part of our model
        back["y_embedder.embedding_table.weight"] = back["y_embedder.embedding_table.weight"][:-1]
    pos = pos_embed_deviation(own, cfg)
    back["pos_embed"] = own["pos_embed"]  # not stored by diffusers (recomputed); its deviation is recorded
    if set(back) != set(own) or not all(torch.equal(back[k], own[k]) for k in own):
        raise ArtifactError(f"the weights written to {folder} do not map back to the model's exactly (internal error)")
    g = torch.Generator().manual_seed(seed)
    s, c = cfg.input_size, cfg.in_channels
    x = torch.randn(4, c, s, s, generator=g).numpy()
    t = [0, 250, 600, 999]
    probes = [{"x": x[i:i + 1], "t": np.array([ti]), "y": np.array([i % cfg.num_classes])} for i, ti in enumerate(t)]

    def theirs(f: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            x, t, y = (torch.from_numpy(f[k]) for k in "xty")
            return tr(x, timestep=t, class_labels=y).sample.float().numpy()

    # recorded, not judged: diffusers' timestep sinusoid differs from ours for t > 0
    res = compare_runs(torch_reference(net), theirs, probes, thresholds=None, what="the written transformer",
                       against="the model")
    rel = [p.report.rel_l2 for p in res.probes]
    return {"weights_identical": True, "pos_embed_max_abs_vs_sincos": pos, "timesteps": t, "forward_rel_l2_by_timestep": rel,
            "note": "diffusers' timestep sinusoid divides by 127, the official DiT's by 128: identical at t=0, "
                    "differs for t>0 (see docs/diffusers.md)"}


def require_diffusers(what: str) -> Any:
    from ditdeploy.errors import require

    return require("diffusers", "vae", what)


def write_snapshot(net: Any, out: str | os.PathLike, *, vae: str | os.PathLike | None = None,
                   id2label: Mapping[int, str] | None = None, verify: bool = True, seed: int = 0,
                   source: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``net`` (a ``ditdeploy.models.DiT`` with ``.config``) as a diffusers DiT snapshot folder ``out``.

    ``DiTPipeline.from_pretrained(out)`` loads it: transformer (safetensors), ``vae/`` (copied from the AutoencoderKL
    folder ``vae``, else none), DDIM scheduler over the official schedule, ``id2label`` in model_index.json. Built
    in a hidden folder beside ``out`` and renamed into place; ``ditdeploy_manifest.json`` inside records sha256 of
    every file and, with ``verify``, that the written weights map back bit-exactly. Returns that manifest.
    """
    import torch

    from ditdeploy.artifact.files import (
        atomic_folder,
        check_new_folder,
        folder_files,
        tool_versions,
        write_json_atomic,
    )

    diffusers = require_diffusers("writing a diffusers snapshot")
    out = Path(out)
    cfg = net.config
    kwargs = diffusers_config(cfg)
    check_new_folder(out)
    vae_model = None
    if vae is not None:
        vae_model = load_vae(vae)
    with atomic_folder(out) as tmp:
        with quiet_diffusers(), torch.device("meta"):
            tr = diffusers.DiTTransformer2DModel(**kwargs)
        mapped = {k: v.detach().to("cpu", torch.float32).clone() for k, v in from_official(net.state_dict(), cfg).items()}
        tr.load_state_dict(mapped, strict=True, assign=True)  # own copies: the per-block embedders must not alias
        with quiet_diffusers():
            pipe = diffusers.DiTPipeline(transformer=tr.eval(), vae=vae_model, scheduler=_scheduler(diffusers))
            pipe.save_pretrained(str(tmp), safe_serialization=True)
        if id2label:
            idx = tmp / INDEX
            m = json.loads(idx.read_text())
            m["id2label"] = {str(k): v for k, v in sorted(id2label.items())}
            idx.write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
        manifest = {
            "kind": "diffusers-snapshot", "config": dataclasses.asdict(cfg), "diffusers_config": kwargs,
            "source": dict(source or {}), "vae": vae_model is not None, "id2label": bool(id2label),
            "tools": tool_versions() | {"diffusers": diffusers.__version__},
            "parity": _written_parity(net, tmp, seed) if verify else None, "verified": verify,
        }
        manifest["files"] = folder_files(tmp)
        write_json_atomic(tmp / MANIFEST_NAME, manifest)
    return manifest
