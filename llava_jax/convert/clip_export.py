"""Our Flax `CLIPModel` <-> a Hugging Face `CLIPModel` directory, and loading a CLIP training workdir.

    python -m llava_jax.convert clip-to-hf WORKDIR_OR_CLIP_DIR OUT_DIR [--dtype float32]

The directory written is what `CLIPModel.save_pretrained` + `CLIPProcessor.save_pretrained` write: config.json
(`CLIPConfig` with text and vision configs), model.safetensors (HF key layout, `hf_keys.clip_model_rules`), the
tokenizer files, and preprocessor_config.json (`CLIPImageProcessor`). It is written into a temporary sibling and
renamed into place, so a crash never leaves a half-written model directory. `selection.select
--config.clip.model_dir=OUT_DIR` and `llava_jax.convert compose --vision OUT_DIR` read it like any HF CLIP.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from llava_jax.convert import hf_keys
from llava_jax.convert.params import flat_params, to_numpy
from llava_jax.convert.safetensors_io import CheckpointFormatError, write_sharded
from llava_jax.models.clip import CLIPModel

CLIP_RUN_KIND = "clip"  # run.json "model" of a llava_jax.clip_train workdir


def _np_dtype(name: str) -> np.dtype:
    import ml_dtypes

    table = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
             "bfloat16": np.dtype(ml_dtypes.bfloat16)}
    if name not in table:
        raise CheckpointFormatError(f"unsupported export dtype {name!r}; choose float32, float16 or bfloat16")
    return table[name]


def hf_clip_config(model: CLIPModel) -> Any:
    """The transformers `CLIPConfig` of our model (architectures = CLIPModel)."""
    from transformers import CLIPConfig

    vision = model.vision_model.config.to_hf()
    text = model.text_model.config.to_hf()
    for d in (vision, text):
        d.pop("model_type", None)
    text["projection_dim"] = vision["projection_dim"] = model.projection_dim
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=model.projection_dim,
                        logit_scale_init_value=float(np.asarray(model.logit_scale[...])))
    config.architectures = ["CLIPModel"]
    return config


def save_hf_clip(out_dir: str | os.PathLike, model: CLIPModel, tokenizer: Any, image_config: Any,
                 dtype: str = "float32") -> Path:
    """Writes `model` (+ tokenizer and image preprocessing) as a transformers CLIPModel directory, atomically.

    Args:
      out_dir: the directory to create or replace.
      model: our CLIPModel (any sharding; gathered to the host).
      tokenizer: a transformers tokenizer (saved with `save_pretrained`), or None.
      image_config: a `llava_jax.data.images.ImageConfig` (its `CLIPImageProcessor` equivalent is saved), or None.
      dtype: weight dtype on disk.
    Returns:
      the output path.
    """
    from transformers import CLIPImageProcessor

    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tensors = hf_keys.ours_to_hf(to_numpy(flat_params(model)), hf_keys.clip_model_rules(), _np_dtype(dtype))
        write_sharded(tmp, tensors, always_index=False)  # model.safetensors, as save_pretrained writes
        config = hf_clip_config(model)
        config.dtype = dtype
        config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if image_config is not None:
            kw = image_config.to_preprocessor_config()
            kw.pop("image_processor_type", None)
            CLIPImageProcessor(**kw).save_pretrained(str(tmp))
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def is_clip_workdir(path: str | os.PathLike) -> bool:
    """True for a `llava_jax.clip_train` workdir (run.json with "model": "clip")."""
    from llava_jax.checkpoint import RUN_FILE
    from llava_jax.io import read_json

    p = Path(path) / RUN_FILE
    return p.is_file() and read_json(p).get("model") == CLIP_RUN_KIND


def load_clip_any(path: str | os.PathLike, step: int | None = None, dtype=None, param_dtype=None
                  ) -> tuple[CLIPModel, Any, Any]:
    """A CLIP training workdir (its starting model + the latest, or `step`'s, checkpoint) or an HF CLIPModel
    directory -> (our CLIPModel, tokenizer or None, ImageConfig or None)."""
    import jax.numpy as jnp
    from flax import nnx

    from llava_jax import checkpoint as ckpt
    from llava_jax.convert.model_dir import load_clip
    from llava_jax.io import read_json

    dtype, param_dtype = dtype or jnp.float32, param_dtype or jnp.float32
    d = Path(path)
    if not is_clip_workdir(d):
        if not (d / "config.json").is_file():
            raise CheckpointFormatError(f"{d} is neither a CLIP training workdir (run.json) nor a Hugging Face "
                                        "CLIP directory (config.json)")
        return load_clip(d, dtype=dtype, param_dtype=param_dtype)
    info = read_json(d / ckpt.RUN_FILE)
    model, tokenizer, image_config = load_clip(info["init_from"], dtype=dtype, param_dtype=param_dtype)
    params = nnx.state(model, nnx.Param)
    _, restored = ckpt.restore_params(d / ckpt.CHECKPOINT_SUBDIR, params, step=step)
    nnx.replace_by_pure_dict(params, restored)
    nnx.update(model, params)
    return model, tokenizer, image_config


def clip_to_hf(path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32") -> Path:
    """`convert clip-to-hf`: a CLIP workdir or HF CLIP dir -> an HF CLIPModel directory."""
    model, tokenizer, image_config = load_clip_any(path)
    if tokenizer is None:
        raise CheckpointFormatError(f"{path} holds no tokenizer; a CLIP directory needs its text tokenizer")
    return save_hf_clip(out_dir, model, tokenizer, image_config, dtype=dtype)
