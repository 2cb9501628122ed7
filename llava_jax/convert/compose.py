"""`convert compose`: a stage-1 starting model from a CLIP directory and a LLaMA / Vicuna directory.

The tokenizer gains `<image>` (and `<pad>` when it has no pad token); the vocabulary is padded to a multiple
(64 by default, as the official LLaVA -> HF conversion does) and the new rows of the input embedding and of
the output head are drawn from a normal distribution centred on the mean of the old rows with a small
covariance (1e-5 x their covariance), the scheme of that conversion. The projector is freshly initialised, or
read from a PyTorch LLaVA repo stage-1 `mm_projector.bin` / `.safetensors` (`--projector-weights`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.convert import hf_keys
from llava_jax.convert.model_dir import (
    DEFAULT_TEMPLATE,
    _source_dtype,
    clip_configs,
    clip_vision_params,
    image_config_from_dir,
    load_tokenizer,
    save_model_dir,
)
from llava_jax.convert.params import flat_params, param_shapes, to_numpy
from llava_jax.convert.safetensors_io import CheckpointFormatError, read_directory
from llava_jax.io import read_json
from llava_jax.models.llama import LlamaConfig, LlamaForCausalLM
from llava_jax.models.llava import LlavaConfig, Projector
from llava_jax.tiny import IMAGE_TOKEN, PAD_TOKEN


def grow_rows(table: np.ndarray, new_rows: int, seed: int = 0) -> np.ndarray:
    """Appends `new_rows` rows to table [V, D], sampled around the mean of the existing rows."""
    if new_rows <= 0:
        return table
    old = table.astype(np.float64)
    mu = old.mean(axis=0)
    centred = old - mu
    sigma = centred.T @ centred / max(len(old), 1)
    cov = 1e-5 * sigma + 1e-12 * np.eye(len(mu))
    try:
        chol = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        chol = np.diag(np.sqrt(np.clip(np.diag(cov), 0, None)))
    z = np.random.default_rng(seed).standard_normal((new_rows, len(mu)))
    return np.concatenate([table, (mu + z @ chol.T).astype(table.dtype)], axis=0)


def add_llava_tokens(tokenizer, extra_tokens: tuple[str, ...] = ()) -> None:
    """Adds `<image>` (and `<pad>` when the tokenizer has no pad token, and any `extra_tokens` it lacks, in
    that order first) to `tokenizer` in place, as special tokens."""
    from transformers import AddedToken

    vocab = tokenizer.get_vocab()
    extra = [t for t in extra_tokens if t not in vocab]
    if extra:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in extra], special_tokens=True)
    added = {}
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        added["additional_special_tokens"] = [AddedToken(IMAGE_TOKEN, special=True, normalized=False)]
    if tokenizer.pad_token is None:
        added["pad_token"] = AddedToken(PAD_TOKEN, special=True, normalized=False)
    if added:
        tokenizer.add_special_tokens(added)


def prepare_language_model(text_tensors: dict[str, np.ndarray], text: LlamaConfig, tokenizer, *,
                           pad_to_multiple_of: int = 64, seed: int = 0, hf_model: str = "model.",
                           hf_head: str = "lm_head.weight", extra_tokens: tuple[str, ...] = ()
                           ) -> tuple[dict[str, np.ndarray], LlamaConfig]:
    """A LLaMA checkpoint's tensors -> our `language_model.*` parameters with the vocabulary grown for LLaVA.

    The tokenizer gains `<image>` (and `<pad>`, `extra_tokens`) in place; the vocabulary becomes
    max(len(tokenizer), vocab_size) rounded up to `pad_to_multiple_of` (0: no rounding), new rows of the
    embedding [V, D] and of the head kernel [D, V] drawn by `grow_rows`. `hf_model` / `hf_head` name the
    decoder prefix and head key (LlamaForCausalLM's by default). Other tensors are the caller's to remove.

    Returns (flat params, the LlamaConfig with the new vocab_size and pad_token_id)."""
    add_llava_tokens(tokenizer, extra_tokens)
    vocab = max(len(tokenizer), text.vocab_size)
    if pad_to_multiple_of:
        vocab = -(-vocab // pad_to_multiple_of) * pad_to_multiple_of
    expected = param_shapes(lambda: LlamaForCausalLM(text, rngs=nnx.Rngs(0)))
    if text.tie_word_embeddings:
        text_tensors = {k: v for k, v in text_tensors.items() if k != hf_head}
    lm = hf_keys.hf_to_ours(text_tensors, hf_keys.llama_rules(hf_model, hf_head, "language_model."),
                            {"language_model." + k: v for k, v in expected.items()}, np.dtype(np.float32))
    extra = vocab - text.vocab_size
    lm["language_model.embed_tokens"] = grow_rows(lm["language_model.embed_tokens"], extra, seed)
    if "language_model.lm_head" in lm:
        lm["language_model.lm_head"] = grow_rows(lm["language_model.lm_head"].T, extra, seed + 1).T
    text = dataclasses.replace(text, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id)
    return lm, text


def compose(vision_dir: str | os.PathLike, text_dir: str | os.PathLike, out_dir: str | os.PathLike,
            projector: str | None = None, *, vision_feature_layer: int | tuple[int, ...] = -2,
            vision_feature_select_strategy: str = "default", projector_hidden_act: str = "gelu",
            image_aspect: str = "pad", pad_to_multiple_of: int = 64, template: str = DEFAULT_TEMPLATE,
            seed: int = 0, projector_weights: str | os.PathLike | None = None) -> Path:
    """Builds and saves (our layout) a LLaVA model from HF CLIP and LLaMA directories.

    The projector is freshly initialised, or read from `projector_weights`: a stage-1 `mm_projector.bin` /
    `.safetensors` of the PyTorch LLaVA repo (its `--pretrain_mm_mlp_adapter`; .bin read weights-only). Its
    kind (linear / mlp2x_gelu) comes from the file; `projector` (default mlp2x_gelu) must agree with it."""
    proj_file = None
    if projector_weights is not None:
        from llava_jax.convert.llava_repo import read_projector_file

        kind, proj_file = read_projector_file(projector_weights)
        if projector is not None and projector != kind:
            raise CheckpointFormatError(f"{projector_weights} holds a {kind} projector, not {projector}")
        projector = kind
    projector = projector or "mlp2x_gelu"
    vision_dir, text_dir = Path(vision_dir), Path(text_dir)
    vision, _, _ = clip_configs(read_json(vision_dir / "config.json"))
    text_cfg_dict = read_json(text_dir / "config.json")
    if text_cfg_dict.get("model_type") not in ("llama", "mistral"):
        raise CheckpointFormatError(f"{text_dir} is not a LLaMA model (model_type {text_cfg_dict.get('model_type')!r})")
    text = LlamaConfig.from_hf(text_cfg_dict)
    tokenizer = load_tokenizer(text_dir)
    if tokenizer is None:
        raise CheckpointFormatError(f"{text_dir} has no tokenizer")
    text_tensors = read_directory(text_dir)
    lm, text = prepare_language_model(text_tensors, text, tokenizer, pad_to_multiple_of=pad_to_multiple_of,
                                      seed=seed)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    # ---- vision tower and a fresh projector
    vis = clip_vision_params(read_directory(vision_dir), vision, "vision_tower.")
    config = LlavaConfig(vision=vision, text=text, image_token_id=image_token_id, projector=projector,
                         projector_hidden_act=projector_hidden_act, vision_feature_layer=vision_feature_layer,
                         vision_feature_select_strategy=vision_feature_select_strategy,
                         pad_token_id=tokenizer.pad_token_id)
    in_dim = vision.hidden_size * len(config.feature_layers)
    if proj_file is not None:
        from llava_jax.convert.llava_repo import projector_params

        proj_params = projector_params(proj_file, projector, in_dim, text.hidden_size, str(projector_weights))
    else:
        proj = Projector(in_dim, text.hidden_size, projector, projector_hidden_act, True,
                         rngs=nnx.Rngs(params=seed), param_dtype=jnp.float32)
        proj_params = {"projector." + k: v for k, v in to_numpy(flat_params(proj)).items()}
    params = {**vis, **lm, **proj_params}
    image_config = image_config_from_dir(vision_dir, aspect=image_aspect)
    if image_config is None:
        from llava_jax.data.images import ImageConfig

        image_config = ImageConfig(size=vision.image_size, crop_size=vision.image_size, aspect=image_aspect)
    return save_model_dir(out_dir, None, config, tokenizer, image_config, template=template,
                          source_dtype=_source_dtype(text_tensors), params=params)
