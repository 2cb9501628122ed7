"""LLaVA in Flax NNX: CLIP vision features -> projector -> LLaMA, equal to transformers'
`LlavaForConditionalGeneration` on the same weights.

Image features are written into the positions of the image token with static shapes: every sequence holding
an image carries exactly `num_image_tokens` image tokens (the data pipeline expands `<image>`), and a batch can
mix samples with and without images (`has_image`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.models import frozen as F
from llava_jax.models import layers as L
from llava_jax.models.clip import CLIPVisionConfig, CLIPVisionModel
from llava_jax.models.llama import Cache, LlamaConfig, LlamaForCausalLM

PROJECTORS = ("linear", "mlp2x_gelu")


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """A LLaVA model: vision tower, projector and language model."""

    vision: CLIPVisionConfig
    text: LlamaConfig
    image_token_id: int
    projector: str = "mlp2x_gelu"
    projector_hidden_act: str = "gelu"
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"
    multimodal_projector_bias: bool = True
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.projector not in PROJECTORS:
            raise L.UnsupportedConfigError(f"projector must be one of {PROJECTORS}, got {self.projector!r}")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise L.UnsupportedConfigError(
                f"vision_feature_select_strategy must be 'default' or 'full', got {self.vision_feature_select_strategy!r}")
        F.freeze_fields(self)  # a feature-layer list -> tuple: the config must be hashable
        n = self.vision.num_hidden_layers
        for layer in self.feature_layers:
            if not -(n + 1) <= layer <= n:
                raise L.UnsupportedConfigError(f"vision_feature_layer {layer} is outside a {n}-layer tower")

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """The selected vision layers as indices into the (num_layers + 1)-long hidden-state list."""
        layers = self.vision_feature_layer
        layers = (layers,) if isinstance(layers, int) else tuple(layers)
        n = self.vision.num_hidden_layers
        return tuple(x if x >= 0 else n + 1 + x for x in layers)

    @property
    def num_image_tokens(self) -> int:
        """How many positions one image occupies in the sequence."""
        return self.vision.num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> LlavaConfig:
        """From a transformers LlavaConfig dict (config.json)."""
        text = dict(d.get("text_config") or {})
        if "tie_word_embeddings" not in text and "tie_word_embeddings" in d:
            text["tie_word_embeddings"] = d["tie_word_embeddings"]
        if text.get("model_type", "llama") not in ("llama", "mistral", "vicuna"):
            raise L.UnsupportedConfigError(f"text model type {text.get('model_type')!r} is not LLaMA")
        image_token = d.get("image_token_index", d.get("image_token_id"))
        if image_token is None:
            raise L.UnsupportedConfigError("config has no image_token_index")
        return cls(
            vision=CLIPVisionConfig.from_hf(d.get("vision_config") or {}),
            text=LlamaConfig.from_hf(text),
            image_token_id=int(image_token),
            projector=d.get("llava_jax_projector", "mlp2x_gelu"),
            projector_hidden_act=d.get("projector_hidden_act", "gelu"),
            vision_feature_layer=d.get("vision_feature_layer", -2),
            vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
            multimodal_projector_bias=d.get("multimodal_projector_bias", True),
            pad_token_id=d.get("pad_token_id", text.get("pad_token_id")),
        )

    def to_hf(self) -> dict[str, Any]:
        """The transformers LlavaConfig dict (config.json of an exported model)."""
        layer = self.vision_feature_layer
        d = {
            "architectures": ["LlavaForConditionalGeneration"],
            "model_type": "llava",
            "vision_config": self.vision.to_hf(),
            "text_config": self.text.to_hf(),
            "image_token_index": self.image_token_id,
            "image_seq_length": self.num_image_tokens,
            "projector_hidden_act": self.projector_hidden_act,
            "vision_feature_layer": F.thaw(layer),
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "multimodal_projector_bias": self.multimodal_projector_bias,
            "tie_word_embeddings": self.text.tie_word_embeddings,
            "pad_token_id": self.pad_token_id,
        }
        if self.projector != "mlp2x_gelu":
            d["llava_jax_projector"] = self.projector
        return d

    def replace(self, **kw) -> LlavaConfig:
        return dataclasses.replace(self, **kw)


class Projector(nnx.Module):
    """Maps vision features [B, N, Dv*k] to the language model width [B, N, D]: one linear layer, or
    linear -> activation -> linear (`mlp2x_gelu`)."""

    def __init__(self, in_dim: int, out_dim: int, kind: str, act: str, bias: bool, *, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        self.kind, self.act, self.dtype = kind, act, dtype
        second_axis = "embed" if kind == "linear" else "mlp"
        self.linear_1_kernel = L.param(rngs, L.normal(in_dim**-0.5), (in_dim, out_dim),
                                       ("vision_embed", second_axis), param_dtype)
        self.linear_1_bias = L.param(rngs, L.zeros, (out_dim,), (second_axis,), param_dtype) if bias else None
        if kind == "mlp2x_gelu":
            self.linear_2_kernel = L.param(rngs, L.normal(out_dim**-0.5), (out_dim, out_dim), ("mlp", "embed"),
                                           param_dtype)
            self.linear_2_bias = L.param(rngs, L.zeros, (out_dim,), ("embed",), param_dtype) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., in_dim] -> [..., out_dim]."""
        x = x.astype(self.dtype)
        b1 = self.linear_1_bias[...] if self.linear_1_bias is not None else None
        y = L.dense(x, self.linear_1_kernel[...], b1)
        if self.kind == "mlp2x_gelu":
            b2 = self.linear_2_bias[...] if self.linear_2_bias is not None else None
            y = L.dense(L.activation(self.act)(y), self.linear_2_kernel[...], b2)
        return y


class Llava(nnx.Module):
    """The LLaVA model: `vision_tower` (CLIPVisionModel), `projector`, `language_model` (LlamaForCausalLM)."""

    def __init__(self, config: LlavaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 attention_impl: str | None = None, remat: str | None = None):
        self.config, self.dtype, self.remat = config, dtype, remat
        self.vision_tower = CLIPVisionModel(config.vision, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        in_dim = config.vision.hidden_size * len(config.feature_layers)
        self.projector = Projector(in_dim, config.text.hidden_size, config.projector, config.projector_hidden_act,
                                   config.multimodal_projector_bias, rngs=rngs, dtype=dtype,
                                   param_dtype=param_dtype)
        self.language_model = LlamaForCausalLM(config.text, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                               attention_impl=attention_impl, remat=remat)

    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values [B, H, W, 3] -> projected image features [B, num_image_tokens, D]; packed rows'
        image slots [B, M, H, W, 3] -> [B, M, num_image_tokens, D]."""
        if pixel_values.ndim == 5:
            b, m = pixel_values.shape[:2]
            feats = self.image_features(pixel_values.reshape((b * m,) + pixel_values.shape[2:]))
            return feats.reshape((b, m) + feats.shape[1:])
        layers = self.config.feature_layers
        hidden, _ = self.vision_tower(pixel_values, num_layers=max(layers), remat=self.remat)
        feats = jnp.concatenate([hidden[i] for i in layers], axis=-1)
        if self.config.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        return self.projector(feats)

    def merge(self, input_ids: jax.Array, image_features: jax.Array | None,
              has_image: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
        """Token embeddings [B, T, D] with the k-th image token of each sample replaced by its k-th feature.

        input_ids [B, T]; image_features [B, N, D]; has_image [B] bool (samples without an image keep their
        token embeddings). Packed rows (`data.packing`): image_features [B, M, N, D] (M image slots per row,
        filled in the order of the row's samples), has_image [B, M] int: the segment id of the sample owning
        slot m (0 = empty slot), segment_ids [B, T]; the image tokens of the samples owning a slot, read left to
        right, take the slots' features in order, so each sample's image lands at its own image tokens."""
        embeds = self.language_model.embed(input_ids)
        if image_features is None:
            return embeds
        is_image = input_ids == self.config.image_token_id
        if image_features.ndim == 4:
            b, m, n_img, d = image_features.shape
            if has_image is not None:
                owner = has_image.astype(jnp.int32)
                seg = segment_ids if segment_ids is not None else jnp.ones_like(input_ids)
                owned = (seg.astype(jnp.int32)[:, :, None] == owner[:, None, :]) & (owner[:, None, :] > 0)
                is_image = is_image & jnp.any(owned, axis=-1)
            image_features = image_features.reshape(b, m * n_img, d)
        elif has_image is not None:
            is_image = is_image & has_image.astype(bool)[:, None]
        n = image_features.shape[1]
        index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, n - 1)
        gathered = jnp.take_along_axis(image_features.astype(embeds.dtype), index[..., None], axis=1)
        return jnp.where(is_image[..., None], gathered, embeds)

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
                 has_image: jax.Array | None = None, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, cache: Cache | None = None,
                 return_hidden: bool = False, lora_key: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> tuple[jax.Array, Cache | None]:
        """Runs LLaVA.

        Args:
          input_ids: [B, T] int32, image positions hold image_token_id (num_image_tokens per image).
          pixel_values: [B, H, W, 3] normalised images, or None for a text-only batch; packed rows:
            [B, M, H, W, 3] image slots (see `merge`).
          has_image: [B] bool, which samples carry an image (all, by default, when pixel_values is given);
            packed rows: [B, M] int, the segment id owning each image slot (0 = empty).
          attention_mask, positions, cache, return_hidden, lora_key, segment_ids: as in
            `LlamaForCausalLM.__call__` (segment_ids [B, T]: packed rows, one id per sample, 0 = padding).
        Returns:
          (logits [B, T, V] or final hidden [B, T, D], cache or None).
        """
        feats = self.image_features(pixel_values) if pixel_values is not None else None
        embeds = self.merge(input_ids, feats, has_image, segment_ids)
        extra = {} if segment_ids is None else {"segment_ids": segment_ids}
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, positions=positions,
                                   cache=cache, return_hidden=return_hidden, lora_key=lora_key, **extra)


def build_llava(config: LlavaConfig, *, seed: int = 0, dtype=jnp.float32, param_dtype=jnp.float32,
                attention_impl: str | None = None, remat: str | None = None) -> Llava:
    """A randomly initialised LLaVA model."""
    return Llava(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(params=seed),
                 attention_impl=attention_impl, remat=remat)


def set_scan_unroll(model: nnx.Module, unroll: int | bool) -> None:
    """Sets how many layers each scanned layer stack (CLIP encoder, LLaMA decoder) runs per loop iteration:
    an int, or True for fully unrolled (then XLA's cost analysis sees every layer)."""
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "scan_unroll"):
            module.scan_unroll = unroll


def feature_layers_arg(value: int | Sequence[int]) -> int | tuple[int, ...]:
    """Normalises a vision_feature_layer value (int, list or tuple)."""
    return int(value) if isinstance(value, int) else tuple(int(v) for v in value)
