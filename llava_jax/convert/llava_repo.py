"""Checkpoints of the PyTorch LLaVA repo (haotian-liu/LLaVA): `convert from-llava` and stage-1 projector files.

What such a directory holds (LLaVA's `LlavaLlamaForCausalLM`, e.g. llava-v1.5-7b):
  config.json      a LLaMA config plus `mm_vision_tower` (a CLIP name or directory), `mm_projector_type`
                   (linear | mlp2x_gelu; 'linear' when absent), `mm_vision_select_layer`, `mm_vision_select_feature`
                   (patch: CLS dropped | cls_patch: kept), `mm_hidden_size`, `image_aspect_ratio` (pad; anything
                   else but anyres is the plain CLIP resize + centre crop), `mm_use_im_start_end`,
                   `mm_use_im_patch_token` (LLaVA adds `<im_patch>` to the tokenizer then; default true),
                   `mm_patch_merge_type` (flat).
  weights          `model.embed_tokens`, `model.layers.N.*`, `model.norm`, `lm_head`, `model.mm_projector.{0,2}.*`
                   (mlp2x_gelu) or `model.mm_projector.{weight,bias}` (linear); the CLIP tower is not stored
                   (unless the tower was trained: `model.vision_tower.vision_tower.vision_model.*`, which then
                   replaces the CLIP directory's). safetensors or `pytorch_model-0000K-of-0000N.bin` + index.
  tokenizer        LLaMA / Vicuna tokenizer files; it has no `<image>` token (LLaVA splices the features in at
                   an out-of-vocabulary index).
The vision tower comes from a separate CLIP directory, as LLaVA loads it (`--vision`, or the config's
`mm_vision_tower` when that names a local directory). The result is our model directory with `<image>` (and
`<pad>` when missing) added and the vocabulary padded as `convert compose` does; every original token keeps its id
and its weights, so logits over the original vocabulary are LLaVA's.

Refused with a named error: `mm_use_im_start_end` (image start/end tokens around the features), `anyres` /
`spatial*` patch merging (LLaVA-NeXT), S2 towers, projectors other than linear / mlp2x_gelu, non-LLaMA
backbones (MPT), and `.bin` files that need more than a weights-only unpickle (`UnsafeCheckpointError`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from llava_jax.convert import hf_keys
from llava_jax.convert.compose import prepare_language_model
from llava_jax.convert.model_dir import (
    DEFAULT_TEMPLATE,
    _source_dtype,
    clip_configs,
    clip_vision_params,
    image_config_from_dir,
    load_tokenizer,
    save_model_dir,
)
from llava_jax.convert.params import param_shapes
from llava_jax.convert.safetensors_io import CheckpointFormatError
from llava_jax.convert.torch_bin import read_any_directory, read_weights_file
from llava_jax.io import read_json
from llava_jax.models.layers import UnsupportedConfigError
from llava_jax.models.llama import LlamaConfig
from llava_jax.models.llava import LlavaConfig, Projector
from llava_jax.tiny import IMAGE_TOKEN

PROJECTOR_PREFIX = "model.mm_projector."
TOWER_PREFIX = "model.vision_tower.vision_tower."
IM_PATCH_TOKEN = "<im_patch>"


@dataclasses.dataclass(frozen=True)
class LlavaRepoSettings:
    """What a LLaVA-repo config.json says, in our terms."""

    text: LlamaConfig
    projector: str  # linear | mlp2x_gelu
    vision_feature_layer: int
    vision_feature_select_strategy: str  # default (LLaVA 'patch') | full ('cls_patch')
    image_aspect: str  # pad | crop
    mm_hidden_size: int | None
    vision_tower: str | None
    use_im_patch_token: bool


def is_llava_repo_config(d: dict[str, Any]) -> bool:
    """Whether a config.json dict is the PyTorch LLaVA repo's (flat LLaMA config + `mm_*` fields)."""
    archs = d.get("architectures") or []
    return "mm_vision_tower" in d or any(str(a).startswith("Llava") and str(a).endswith("ForCausalLM")
                                         for a in archs)


def parse_llava_repo_config(d: dict[str, Any], source: str = "config.json") -> LlavaRepoSettings:
    """Reads a LLaVA-repo config dict. Raises CheckpointFormatError when it is not one and
    UnsupportedConfigError for features llava_jax does not reproduce."""
    if not is_llava_repo_config(d):
        raise CheckpointFormatError(f"{source} is not a LLaVA-repo checkpoint config (no mm_vision_tower)")
    archs = [str(a) for a in d.get("architectures") or []]
    if archs and "LlavaLlamaForCausalLM" not in archs:
        raise UnsupportedConfigError(f"{source}: architecture {archs} is not supported; only LlavaLlamaForCausalLM")
    if d.get("model_type") not in (None, "llava", "llava_llama", "llama"):
        raise UnsupportedConfigError(f"{source}: model_type {d.get('model_type')!r} is not a LLaMA-based LLaVA")
    if d.get("mm_use_im_start_end"):
        raise UnsupportedConfigError(
            f"{source}: mm_use_im_start_end is true (the image features are wrapped in <im_start>/<im_end> "
            "tokens); llava_jax's templates and pipeline do not insert them, so this checkpoint is not supported")
    merge = d.get("mm_patch_merge_type") or "flat"
    aspect = d.get("image_aspect_ratio")
    if merge != "flat" or aspect == "anyres":
        raise UnsupportedConfigError(
            f"{source}: image_aspect_ratio {aspect!r} / mm_patch_merge_type {merge!r} is LLaVA-NeXT's multi-crop "
            "layout, which is not supported (only flat patch features of one image)")
    if d.get("s2"):
        raise UnsupportedConfigError(f"{source}: S2 multi-scale vision towers are not supported")
    projector = d.get("mm_projector_type") or "linear"
    if projector not in ("linear", "mlp2x_gelu"):
        raise UnsupportedConfigError(f"{source}: mm_projector_type {projector!r} is not supported "
                                     "(linear or mlp2x_gelu)")
    layer = d.get("mm_vision_select_layer")
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise CheckpointFormatError(f"{source}: mm_vision_select_layer must be an integer, got {layer!r}")
    feature = d.get("mm_vision_select_feature") or "patch"
    strategies = {"patch": "default", "cls_patch": "full"}
    if feature not in strategies:
        raise UnsupportedConfigError(f"{source}: mm_vision_select_feature {feature!r} is not patch or cls_patch")
    text = LlamaConfig.from_hf({k: v for k, v in d.items() if not k.startswith("mm_")})
    return LlavaRepoSettings(
        text=text, projector=projector, vision_feature_layer=layer,
        vision_feature_select_strategy=strategies[feature], image_aspect="pad" if aspect == "pad" else "crop",
        mm_hidden_size=d.get("mm_hidden_size"), vision_tower=d.get("mm_vision_tower"),
        use_im_patch_token=bool(d.get("mm_use_im_patch_token", True)))


# ------------------------------------------------------------------------------------------------ projector


def projector_kind(keys: list[str] | set[str], prefix: str = PROJECTOR_PREFIX) -> str:
    """'linear' or 'mlp2x_gelu' from the projector's key names (under `prefix`)."""
    names = {k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix)}
    if names <= {"weight", "bias"} and "weight" in names:
        return "linear"
    if names == {"0", "2"}:
        return "mlp2x_gelu"
    raise UnsupportedConfigError(f"projector with modules {sorted(names)} is neither linear nor mlp2x_gelu")


def projector_params(tensors: dict[str, np.ndarray], kind: str, in_dim: int, out_dim: int,
                     source: str = "checkpoint") -> dict[str, np.ndarray]:
    """`model.mm_projector.*` tensors -> our `projector.*` parameters (kernels [in, out], biases [out]).

    Raises CheckpointFormatError on missing, extra or mis-shaped tensors (e.g. a projector trained for
    another vision tower or LLM width)."""
    expected = param_shapes(lambda: Projector(in_dim, out_dim, kind, "gelu", True, rngs=nnx.Rngs(0)))
    try:
        return hf_keys.hf_to_ours(tensors, hf_keys.llava_repo_projector_rules(kind),
                                  {"projector." + k: v for k, v in expected.items()}, np.dtype(np.float32))
    except CheckpointFormatError as e:
        raise CheckpointFormatError(f"{source}: {e}") from e


def read_projector_file(path: str | os.PathLike) -> tuple[str, dict[str, np.ndarray]]:
    """Reads a stage-1 projector file (`mm_projector.bin` / `.safetensors`, LLaVA's `--pretrain_mm_mlp_adapter`).

    Keys are matched as LLaVA does (whatever precedes `mm_projector.` is ignored). Returns (kind, tensors keyed
    `model.mm_projector.*`). Raises UnsafeCheckpointError for a .bin needing arbitrary unpickling and
    CheckpointFormatError for other contents (e.g. the `embed_tokens` of an mm_use_im_start_end run)."""
    raw = read_weights_file(path)
    tensors, other = {}, []
    for k, v in raw.items():
        if "mm_projector." in k:
            tensors[PROJECTOR_PREFIX + k.split("mm_projector.", 1)[1]] = v
        else:
            other.append(k)
    if other:
        raise CheckpointFormatError(
            f"{path}: holds tensors other than mm_projector.* ({sorted(other)[:5]}); a stage-1 run with "
            "mm_use_im_start_end (which also trains embed_tokens) is not supported")
    if not tensors:
        raise CheckpointFormatError(f"{path}: no mm_projector.* tensors")
    return projector_kind(set(tensors)), tensors


# ------------------------------------------------------------------------------------------------ from-llava


def _vision_dir(settings: LlavaRepoSettings, vision_dir: str | os.PathLike | None) -> Path:
    if vision_dir is not None:
        d = Path(vision_dir)
    elif settings.vision_tower and Path(settings.vision_tower).is_dir():
        d = Path(settings.vision_tower)
    else:
        raise CheckpointFormatError(
            f"the checkpoint's vision tower {settings.vision_tower!r} is not a local directory; pass the CLIP "
            "directory with --vision")
    if not (d / "config.json").is_file():
        raise CheckpointFormatError(f"vision tower directory {d} has no config.json")
    return d


def convert_llava_repo(llava_dir: str | os.PathLike, out_dir: str | os.PathLike,
                       vision_dir: str | os.PathLike | None = None, *, pad_to_multiple_of: int = 64,
                       template: str = DEFAULT_TEMPLATE, seed: int = 0) -> Path:
    """Converts a PyTorch LLaVA repo checkpoint directory (+ its CLIP directory) into our model directory.

    Args:
      llava_dir: the `LlavaLlamaForCausalLM` directory (config.json, weights, tokenizer).
      out_dir: where our layout is written.
      vision_dir: the CLIP (CLIPModel or CLIPVisionModel) directory; default: `mm_vision_tower` if local.
      pad_to_multiple_of: vocabulary rounding after adding `<image>` (0: none).
      template: conversation template recorded with the model (LLaVA-1.5: vicuna_v1).
      seed: seed of the added embedding rows.
    Returns:
      out_dir as a Path.
    """
    src = Path(llava_dir)
    if not (src / "config.json").is_file():
        raise CheckpointFormatError(f"{src} has no config.json")
    settings = parse_llava_repo_config(read_json(src / "config.json"), str(src / "config.json"))
    vdir = _vision_dir(settings, vision_dir)
    vision, _, _ = clip_configs(read_json(vdir / "config.json"))
    if settings.mm_hidden_size is not None and settings.mm_hidden_size != vision.hidden_size:
        raise CheckpointFormatError(f"{src}: mm_hidden_size {settings.mm_hidden_size} but the vision tower in "
                                    f"{vdir} has hidden size {vision.hidden_size}")
    tokenizer = load_tokenizer(src)
    if tokenizer is None:
        raise CheckpointFormatError(f"{src} has no tokenizer")

    tensors = read_any_directory(src)
    proj_tensors = {k: v for k, v in tensors.items() if k.startswith(PROJECTOR_PREFIX)}
    tower_tensors = {"vision_model." + k[len(TOWER_PREFIX + "vision_model."):]: v for k, v in tensors.items()
                     if k.startswith(TOWER_PREFIX + "vision_model.")}
    lm_tensors = {k: v for k, v in tensors.items()
                  if not k.startswith(PROJECTOR_PREFIX) and not k.startswith(TOWER_PREFIX)}
    if not proj_tensors:
        raise CheckpointFormatError(f"{src}: no {PROJECTOR_PREFIX}* weights (a stage-1 output dir holds them in "
                                    "mm_projector.bin: use `convert compose --projector-weights`)")
    found = projector_kind(set(proj_tensors))
    if found != settings.projector:
        raise CheckpointFormatError(f"{src}: config says mm_projector_type {settings.projector!r} but the "
                                    f"weights are a {found} projector")

    lm, text = prepare_language_model(lm_tensors, settings.text, tokenizer, pad_to_multiple_of=pad_to_multiple_of,
                                      seed=seed, extra_tokens=(IM_PATCH_TOKEN,) if settings.use_im_patch_token else ())
    config = LlavaConfig(vision=vision, text=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         projector=settings.projector, projector_hidden_act="gelu",
                         vision_feature_layer=settings.vision_feature_layer,
                         vision_feature_select_strategy=settings.vision_feature_select_strategy,
                         pad_token_id=tokenizer.pad_token_id)
    proj = projector_params(proj_tensors, settings.projector, vision.hidden_size, text.hidden_size, str(src))
    vis = clip_vision_params(tower_tensors or read_any_directory(vdir), vision, "vision_tower.")
    image_config = image_config_from_dir(vdir, aspect=settings.image_aspect)
    if image_config is None:
        from llava_jax.data.images import ImageConfig

        image_config = ImageConfig(size=vision.image_size, crop_size=vision.image_size, aspect=settings.image_aspect)
    return save_model_dir(out_dir, None, config, tokenizer, image_config, template=template,
                          source_dtype=_source_dtype(lm_tensors), params={**vis, **lm, **proj})
