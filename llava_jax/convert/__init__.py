"""Hugging Face <-> llava_jax conversion: key tables, model directories, compose and export."""

from llava_jax.convert.model_dir import (  # noqa: F401
    LoadedModel,
    load_clip,
    load_hf_llava,
    load_model,
    load_model_dir,
    save_model_dir,
)
