"""CLIP in Flax NNX: the vision tower (every layer's hidden states, pooled output) and the text tower with
projections and logit scale, numerically equal to transformers' `CLIPVisionModel` / `CLIPModel`.

Encoder layers are stored stacked (leading axis 'layers') and run with `jax.lax.scan`.
Images are NHWC float32, already CLIP-normalised.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.models import attention as A
from llava_jax.models import frozen as F
from llava_jax.models import layers as L


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Geometry of a CLIP vision tower (field names as in transformers' CLIPVisionConfig)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    projection_dim: int = 768

    def __post_init__(self):
        F.freeze_fields(self)  # hashable: configs are static arguments of jitted functions

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> CLIPVisionConfig:
        """Builds the config from a transformers CLIPVisionConfig dict (unknown keys ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_hf(self) -> dict[str, Any]:
        """The transformers CLIPVisionConfig dict."""
        return {"model_type": "clip_vision_model", **F.fields_as_json(self)}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Geometry of a CLIP text tower (field names as in transformers' CLIPTextConfig)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    projection_dim: int = 512
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1

    def __post_init__(self):
        F.freeze_fields(self)  # hashable: configs are static arguments of jitted functions

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> CLIPTextConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})

    def to_hf(self) -> dict[str, Any]:
        return {"model_type": "clip_text_model", **F.fields_as_json(self)}


class EncoderStack(nnx.Module):
    """`num_layers` pre-LN transformer layers (CLIP's encoder) with stacked parameters.

    Parameter shapes: q/k/v/o kernels [L, D, D], fc1 [L, D, F], fc2 [L, F, D], biases and norms [L, D] / [L, F].
    """

    def __init__(self, num_layers: int, width: int, mlp: int, heads: int, act: str, eps: float, *, rngs,
                 param_dtype=jnp.float32):
        self.num_layers, self.heads, self.act, self.eps = num_layers, heads, act, eps
        self.scan_unroll: int | bool = 1  # layers per scan iteration (True: fully unrolled)
        n, d, f = num_layers, width, mlp
        std = width**-0.5

        def p(init, shape, names):
            return L.param(rngs, init, shape, names, param_dtype)

        self.ln1_scale = p(L.ones, (n, d), ("layers", "norm"))
        self.ln1_bias = p(L.zeros, (n, d), ("layers", "norm"))
        self.q_kernel = p(L.normal(std), (n, d, d), ("layers", "embed", "heads"))
        self.q_bias = p(L.zeros, (n, d), ("layers", "heads"))
        self.k_kernel = p(L.normal(std), (n, d, d), ("layers", "embed", "heads"))
        self.k_bias = p(L.zeros, (n, d), ("layers", "heads"))
        self.v_kernel = p(L.normal(std), (n, d, d), ("layers", "embed", "heads"))
        self.v_bias = p(L.zeros, (n, d), ("layers", "heads"))
        self.o_kernel = p(L.normal(std), (n, d, d), ("layers", "heads", "embed"))
        self.o_bias = p(L.zeros, (n, d), ("layers", "norm"))
        self.ln2_scale = p(L.ones, (n, d), ("layers", "norm"))
        self.ln2_bias = p(L.zeros, (n, d), ("layers", "norm"))
        self.fc1_kernel = p(L.normal(std), (n, d, f), ("layers", "embed", "mlp"))
        self.fc1_bias = p(L.zeros, (n, f), ("layers", "mlp"))
        self.fc2_kernel = p(L.normal(f**-0.5), (n, f, d), ("layers", "mlp", "embed"))
        self.fc2_bias = p(L.zeros, (n, d), ("layers", "norm"))

    _NAMES = ("ln1_scale", "ln1_bias", "q_kernel", "q_bias", "k_kernel", "k_bias", "v_kernel", "v_bias",
              "o_kernel", "o_bias", "ln2_scale", "ln2_bias", "fc1_kernel", "fc1_bias", "fc2_kernel", "fc2_bias")

    def __call__(self, h: jax.Array, mask: jax.Array | None = None, num_layers: int | None = None,
                 remat: str | None = None) -> tuple[jax.Array, jax.Array]:
        """Runs the first `num_layers` layers (all by default).

        Args:
          h: [B, N, D] input hidden states.
          mask: optional bool [B, 1, N, N] attention mask (True = attend).
        Returns:
          (final hidden [B, N, D], every layer's output stacked [num_layers, B, N, D]).
        """
        n = self.num_layers if num_layers is None else num_layers
        weights = {k: getattr(self, k)[...][:n] for k in self._NAMES}
        act = L.activation(self.act)
        heads, eps = self.heads, self.eps

        attention = A.attention_fn(None)

        def body(x, w):
            b, t, d = x.shape
            y = L.layer_norm(x, w["ln1_scale"], w["ln1_bias"], eps)
            q = L.dense(y, w["q_kernel"], w["q_bias"]).reshape(b, t, heads, d // heads)
            k = L.dense(y, w["k_kernel"], w["k_bias"]).reshape(b, t, heads, d // heads)
            v = L.dense(y, w["v_kernel"], w["v_bias"]).reshape(b, t, heads, d // heads)
            a = attention(q, k, v, mask).reshape(b, t, d)
            x = x + L.dense(a, w["o_kernel"], w["o_bias"])
            y = L.layer_norm(x, w["ln2_scale"], w["ln2_bias"], eps)
            y = L.dense(act(L.dense(y, w["fc1_kernel"], w["fc1_bias"])), w["fc2_kernel"], w["fc2_bias"])
            x = L.constrain(x + y, ("activation_batch", "activation_length", "activation_embed"))
            return x, x

        if n == 0:
            return h, jnp.zeros((0, *h.shape), h.dtype)
        return jax.lax.scan(L.maybe_remat(body, remat), h, weights, unroll=self.scan_unroll)


class CLIPVisionModel(nnx.Module):
    """CLIP's vision transformer: patch + class + position embeddings, pre-LN, encoder, post-LN on the CLS token."""

    def __init__(self, config: CLIPVisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config, self.dtype = config, dtype
        c, d = config, config.hidden_size
        self.patch_embedding = L.param(rngs, L.normal(0.02), (c.patch_size, c.patch_size, c.num_channels, d),
                                       (None, None, None, "embed"), param_dtype)
        self.class_embedding = L.param(rngs, L.normal(0.02), (d,), ("embed",), param_dtype)
        self.position_embedding = L.param(rngs, L.normal(0.02), (c.num_patches + 1, d), (None, "embed"),
                                          param_dtype)
        self.pre_layrnorm_scale = L.param(rngs, L.ones, (d,), ("norm",), param_dtype)
        self.pre_layrnorm_bias = L.param(rngs, L.zeros, (d,), ("norm",), param_dtype)
        self.encoder = EncoderStack(c.num_hidden_layers, d, c.intermediate_size, c.num_attention_heads,
                                    c.hidden_act, c.layer_norm_eps, rngs=rngs, param_dtype=param_dtype)
        self.post_layernorm_scale = L.param(rngs, L.ones, (d,), ("norm",), param_dtype)
        self.post_layernorm_bias = L.param(rngs, L.zeros, (d,), ("norm",), param_dtype)

    def embed(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values [B, H, W, C] -> embeddings after pre_layrnorm [B, 1 + N, D]."""
        c = self.config
        x = pixel_values.astype(self.dtype)
        patches = jax.lax.conv_general_dilated(
            x, self.patch_embedding[...].astype(self.dtype), window_strides=(c.patch_size, c.patch_size),
            padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        b = patches.shape[0]
        patches = patches.reshape(b, -1, c.hidden_size)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, c.hidden_size))
        h = jnp.concatenate([cls, patches], axis=1) + self.position_embedding[...].astype(self.dtype)[None]
        return L.layer_norm(h, self.pre_layrnorm_scale[...], self.pre_layrnorm_bias[...], c.layer_norm_eps)

    def __call__(self, pixel_values: jax.Array, num_layers: int | None = None,
                 remat: str | None = None) -> tuple[jax.Array, jax.Array]:
        """Runs the tower.

        Args:
          pixel_values: [B, H, W, C] normalised images.
          num_layers: run only the first layers (the LLaVA feature layer needs no more).
        Returns:
          (hidden_states [num_layers + 1, B, 1 + N, D] — index 0 is the embedding output, as in HF's
          `hidden_states` tuple — and pooled [B, D] = post_layernorm(CLS) of the last layer run).
        """
        h0 = self.embed(pixel_values)
        last, per_layer = self.encoder(h0, num_layers=num_layers, remat=remat)
        hidden = jnp.concatenate([h0[None], per_layer], axis=0)
        pooled = L.layer_norm(last[:, 0], self.post_layernorm_scale[...], self.post_layernorm_bias[...],
                              self.config.layer_norm_eps)
        return hidden, pooled


class CLIPTextModel(nnx.Module):
    """CLIP's text transformer (causal), pooled at the end-of-text token."""

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config, self.dtype = config, dtype
        c, d = config, config.hidden_size
        self.token_embedding = L.param(rngs, L.normal(0.02), (c.vocab_size, d), ("vocab", "embed"), param_dtype)
        self.position_embedding = L.param(rngs, L.normal(0.01), (c.max_position_embeddings, d), (None, "embed"),
                                          param_dtype)
        self.encoder = EncoderStack(c.num_hidden_layers, d, c.intermediate_size, c.num_attention_heads,
                                    c.hidden_act, c.layer_norm_eps, rngs=rngs, param_dtype=param_dtype)
        self.final_layer_norm_scale = L.param(rngs, L.ones, (d,), ("norm",), param_dtype)
        self.final_layer_norm_bias = L.param(rngs, L.zeros, (d,), ("norm",), param_dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """input_ids [B, T] (T <= max_position_embeddings), attention_mask [B, T] (1 = token).

        Returns (last hidden state after the final norm [B, T, D], pooled [B, D])."""
        c = self.config
        b, t = input_ids.shape
        if t > c.max_position_embeddings:
            raise ValueError(f"text of {t} tokens is longer than CLIP's context of {c.max_position_embeddings}")
        h = self.token_embedding[...].astype(self.dtype)[input_ids]
        h = h + self.position_embedding[...].astype(self.dtype)[:t][None]
        mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        h, _ = self.encoder(h, mask=mask)
        h = L.layer_norm(h, self.final_layer_norm_scale[...], self.final_layer_norm_bias[...], c.layer_norm_eps)
        if c.eos_token_id == 2:  # transformers' legacy rule: the highest id is the end-of-text token
            eos_pos = jnp.argmax(input_ids, axis=-1)
        else:
            eos_pos = jnp.argmax((input_ids == c.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = h[jnp.arange(b), eos_pos]
        return h, pooled


class CLIPModel(nnx.Module):
    """Both CLIP towers with their projections and the learned logit scale."""

    def __init__(self, vision: CLIPVisionConfig, text: CLIPTextConfig, projection_dim: int, *,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs, logit_scale_init: float = 2.6592):
        self.projection_dim = projection_dim
        self.vision_model = CLIPVisionModel(vision, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.text_model = CLIPTextModel(text, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.visual_projection = L.param(rngs, L.normal(vision.hidden_size**-0.5),
                                         (vision.hidden_size, projection_dim), ("embed", None), param_dtype)
        self.text_projection = L.param(rngs, L.normal(text.hidden_size**-0.5),
                                       (text.hidden_size, projection_dim), ("embed", None), param_dtype)
        self.logit_scale = nnx.Param(jnp.asarray(logit_scale_init, param_dtype), out_sharding=(),
                                     eager_sharding=False)

    def image_embeds(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values [B, H, W, C] -> projected image embeddings [B, P] (not normalised)."""
        _, pooled = self.vision_model(pixel_values)
        return L.dense(pooled, self.visual_projection[...])

    def text_embeds(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """input_ids [B, T] -> projected text embeddings [B, P] (not normalised)."""
        _, pooled = self.text_model(input_ids, attention_mask)
        return L.dense(pooled, self.text_projection[...])

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array,
                 attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Returns (logits_per_image [Bi, Bt], logits_per_text [Bt, Bi]) = exp(scale) * cosine similarities."""
        img = self.image_embeds(pixel_values)
        txt = self.text_embeds(input_ids, attention_mask)
        img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
        txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
        per_text = jnp.exp(self.logit_scale[...]) * txt @ img.T
        return per_text.T, per_text
