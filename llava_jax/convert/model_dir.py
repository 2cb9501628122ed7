"""Model directories: our own layout, Hugging Face LLaVA / CLIP / LLaMA directories, and one loader for all.

Our layout (written by `save_model_dir`, read by `load_model_dir`):
  llava_jax.json                   {"format": "llava_jax-model", "config": <HF-style LLaVA config dict>,
                                    "image": <preprocessor dict + aspect>, "template": name, "dtype": source dtype,
                                    "lora": LoRA spec (rank, alpha, dropout, targets) or absent}
  model-*.safetensors + index      our flat parameter paths (stacked [layers, ...] tensors; with "lora" also
                                   the adapters `language_model.{target}_lora_{a,b}`, unmerged)
  tokenizer files                  as `save_pretrained` writes them
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from llava_jax.convert import hf_keys
from llava_jax.convert.params import build_with_params, flat_params, param_shapes, to_numpy
from llava_jax.convert.safetensors_io import CheckpointFormatError, read_directory, write_sharded
from llava_jax.io import atomic_write_json, read_json
from llava_jax.models.clip import CLIPModel, CLIPTextConfig, CLIPVisionConfig
from llava_jax.models.llava import Llava, LlavaConfig

MARKER = "llava_jax.json"
FORMAT = "llava_jax-model"
DEFAULT_TEMPLATE = "vicuna_v1"


@dataclasses.dataclass
class LoadedModel:
    """A model ready for inference or training, with what is needed to feed it."""

    model: Llava
    config: LlavaConfig
    tokenizer: Any
    image_config: Any  # llava_jax.data.images.ImageConfig
    template: str = DEFAULT_TEMPLATE
    source_dtype: str = "float32"


def _dtype_name(dtype) -> str:
    return np.dtype(dtype).name if not isinstance(dtype, str) else dtype


def image_config_from_dir(directory: Path, aspect: str = "pad"):
    """The image preprocessing of an HF directory (preprocessor_config.json, or the image_processor entry
    of processor_config.json), defaulting to CLIP's at the vision tower's size."""
    from llava_jax.data.images import ImageConfig

    d = Path(directory)
    for name in ("preprocessor_config.json", "processor_config.json"):
        if (d / name).exists():
            cfg = read_json(d / name)
            cfg = cfg.get("image_processor", cfg)
            if "image_mean" in cfg or "size" in cfg:
                return ImageConfig.from_preprocessor_config(cfg, aspect=aspect)
    return None


def load_tokenizer(directory: str | os.PathLike):
    """`AutoTokenizer.from_pretrained` on a local directory, or None when it holds no tokenizer."""
    from transformers import AutoTokenizer

    d = Path(directory)
    if not any((d / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    return AutoTokenizer.from_pretrained(str(d), local_files_only=True)


def _source_dtype(tensors: dict[str, np.ndarray]) -> str:
    floats = [v.dtype for v in tensors.values() if v.dtype.kind == "f" or v.dtype.name == "bfloat16"]
    return _dtype_name(max(set(floats), key=floats.count)) if floats else "float32"


# ------------------------------------------------------------------------------------------------ our layout


def save_model_dir(out_dir: str | os.PathLike, model: Llava, config: LlavaConfig, tokenizer=None,
                   image_config=None, template: str = DEFAULT_TEMPLATE, source_dtype: str = "float32",
                   params: dict[str, np.ndarray] | None = None, lora_spec: Any = None) -> Path:
    """Writes `model` (or the given flat `params`) in our layout; the marker file is written last, so a
    directory without it is an unfinished write. `lora_spec` (a models.lora.LoraSpec) records that the
    parameters include LoRA adapters (the model's own spec is used when `params` is not given)."""
    from llava_jax.models import lora

    if params is None:
        lora_spec = lora.lora_spec_of(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)
    arrays = params if params is not None else to_numpy(flat_params(model))
    write_sharded(out, arrays)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    image = dict(image_config.to_preprocessor_config(), image_aspect_ratio=image_config.aspect) \
        if image_config is not None else None
    meta = {"format": FORMAT, "version": 1, "config": config.to_hf(), "image": image, "template": template,
            "dtype": source_dtype}
    if lora_spec is not None:
        meta["lora"] = lora_spec.to_json()
    atomic_write_json(out / MARKER, meta)
    return out


def is_model_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MARKER).exists()


def load_model_dir(path: str | os.PathLike, dtype=jnp.float32, param_dtype=jnp.float32,
                   attention_impl: str | None = None, remat: str | None = None) -> LoadedModel:
    """Loads a directory in our layout."""
    from llava_jax.data.images import ImageConfig

    d = Path(path)
    meta = read_json(d / MARKER)
    if meta.get("format") != FORMAT:
        raise CheckpointFormatError(f"{d / MARKER} is not a llava_jax model description")
    config = LlavaConfig.from_hf(meta["config"])
    arrays = read_directory(d)
    spec = None
    if meta.get("lora"):
        from llava_jax.models.lora import LoraSpec

        spec = LoraSpec.from_json(meta["lora"])

    def build() -> Llava:
        model = Llava(config, dtype=dtype, param_dtype=param_dtype, rngs=_rngs(), attention_impl=attention_impl,
                      remat=remat)
        if spec is not None:
            from llava_jax.models.lora import add_lora

            add_lora(model.language_model, spec)
        return model

    model = build_with_params(build, arrays, param_dtype)
    image = meta.get("image")
    image_config = ImageConfig.from_preprocessor_config(image, aspect=image.get("image_aspect_ratio", "pad")) \
        if image else None
    return LoadedModel(model, config, load_tokenizer(d), image_config, meta.get("template", DEFAULT_TEMPLATE),
                       meta.get("dtype", "float32"))


def _rngs():
    from flax import nnx

    return nnx.Rngs(params=0)


# ------------------------------------------------------------------------------------------------ HF LLaVA


def is_hf_llava_dir(path: str | os.PathLike) -> bool:
    """A transformers LLaVA dir (model_type 'llava'; the PyTorch LLaVA repo's flat `mm_*` configs, which older
    releases also label 'llava', are not one)."""
    p = Path(path) / "config.json"
    if not p.exists():
        return False
    d = read_json(p)
    return d.get("model_type") == "llava" and "mm_vision_tower" not in d


def llava_params_from_hf(tensors: dict[str, np.ndarray], config: LlavaConfig, param_dtype=np.float32
                         ) -> dict[str, np.ndarray]:
    """HF LLaVA tensors (either key layout) -> our flat parameters for `config`."""
    canonical = {}
    for k, v in tensors.items():
        ck = hf_keys.canonical_llava_key(k)
        if ck in canonical:
            raise CheckpointFormatError(f"tensor {ck} appears twice (as {k})")
        canonical[ck] = v
    if config.text.tie_word_embeddings:
        canonical.pop("language_model.lm_head.weight", None)
    expected = param_shapes(lambda: Llava(config, rngs=_rngs()))
    return hf_keys.hf_to_ours(canonical, hf_keys.llava_rules(), expected, np.dtype(param_dtype))


def load_hf_llava(path: str | os.PathLike, dtype=jnp.float32, param_dtype=jnp.float32,
                  attention_impl: str | None = None, remat: str | None = None, aspect: str = "crop"
                  ) -> LoadedModel:
    """Loads a transformers `LlavaForConditionalGeneration` directory (classic or `model.language_model.*`
    keys; one file or shards with an index; fp32 / fp16 / bf16)."""
    d = Path(path)
    config = LlavaConfig.from_hf(read_json(d / "config.json"))
    tensors = read_directory(d)
    arrays = llava_params_from_hf(tensors, config)
    model = build_with_params(lambda: Llava(config, dtype=dtype, param_dtype=param_dtype, rngs=_rngs(),
                                            attention_impl=attention_impl, remat=remat), arrays, param_dtype)
    tokenizer = load_tokenizer(d)
    template = "chat_template" if tokenizer is not None and getattr(tokenizer, "chat_template", None) \
        else DEFAULT_TEMPLATE
    return LoadedModel(model, config, tokenizer, image_config_from_dir(d, aspect), template,
                       _source_dtype(tensors))


def load_model(path: str | os.PathLike, dtype=jnp.float32, param_dtype=jnp.float32,
               attention_impl: str | None = None) -> LoadedModel:
    """Loads any model path: our model dir, an HF LLaVA dir, or a training workdir (latest checkpoint); each
    may be local or gs:// (a remote model dir is read through a temporary local copy)."""
    from llava_jax.io import is_remote, local_copy

    if is_remote(path):
        from llava_jax import checkpoint

        if checkpoint.is_workdir(path):
            return checkpoint.load_trained_model(path, dtype=dtype, param_dtype=param_dtype)
        with local_copy(path) as local:
            return load_model(local, dtype, param_dtype, attention_impl)
    d = Path(path)
    if is_model_dir(d):
        return load_model_dir(d, dtype, param_dtype, attention_impl)
    if is_hf_llava_dir(d):
        return load_hf_llava(d, dtype, param_dtype, attention_impl)
    from llava_jax import checkpoint

    if checkpoint.is_workdir(d):
        return checkpoint.load_trained_model(d, dtype=dtype, param_dtype=param_dtype)
    if (d / "config.json").is_file() and "mm_vision_tower" in read_json(d / "config.json"):
        raise CheckpointFormatError(
            f"{d} is a PyTorch LLaVA repo checkpoint; convert it first: "
            f"python -m llava_jax.convert from-llava {d} --vision CLIP_DIR OUT_DIR")
    raise CheckpointFormatError(
        f"{d} is neither a llava_jax model dir ({MARKER}), an HF LLaVA dir (config.json with model_type "
        "'llava') nor a training workdir (run.json)")


# ------------------------------------------------------------------------------------------------ HF CLIP


def clip_configs(d: dict[str, Any]) -> tuple[CLIPVisionConfig, CLIPTextConfig | None, int]:
    """(vision, text or None, projection_dim) of a CLIPConfig / CLIPVisionConfig dict."""
    if d.get("model_type") == "clip":
        vision = CLIPVisionConfig.from_hf(d.get("vision_config") or {})
        text = CLIPTextConfig.from_hf(d.get("text_config") or {})
        return vision, text, int(d.get("projection_dim", vision.projection_dim))
    if d.get("model_type") in ("clip_vision_model", "clip_vision"):
        vision = CLIPVisionConfig.from_hf(d)
        return vision, None, vision.projection_dim
    raise CheckpointFormatError(f"config model_type {d.get('model_type')!r} is not a CLIP model")


def clip_vision_params(tensors: dict[str, np.ndarray], vision: CLIPVisionConfig, prefix: str,
                       param_dtype=np.float32) -> dict[str, np.ndarray]:
    """The vision-tower parameters (our paths under `prefix`) out of a CLIPModel / CLIPVisionModel checkpoint;
    other tensors (text tower, projections) are ignored."""
    from llava_jax.models.clip import CLIPVisionModel

    vision_keys = {k: v for k, v in tensors.items() if k.startswith("vision_model.")}
    expected = param_shapes(lambda: CLIPVisionModel(vision, rngs=_rngs()))
    arrays = hf_keys.hf_to_ours(vision_keys, hf_keys.clip_vision_rules("vision_model.", ""), expected,
                                np.dtype(param_dtype))
    return {prefix + k: v for k, v in arrays.items()}


def load_clip(path: str | os.PathLike, dtype=jnp.float32, param_dtype=jnp.float32):
    """Loads a transformers `CLIPModel` directory into our `CLIPModel`.

    Returns (model, tokenizer or None, image_config or None)."""
    d = Path(path)
    vision, text, proj = clip_configs(read_json(d / "config.json"))
    if text is None:
        raise CheckpointFormatError(f"{d} holds only a vision tower; a CLIPModel with both towers is needed")
    tensors = read_directory(d)

    def build():
        return CLIPModel(vision, text, proj, dtype=dtype, param_dtype=param_dtype, rngs=_rngs())

    arrays = hf_keys.hf_to_ours(tensors, hf_keys.clip_model_rules(), param_shapes(build), np.dtype(np.float32))
    model = build_with_params(build, arrays, param_dtype)
    return model, load_tokenizer(d), image_config_from_dir(d, aspect="crop")
