"""Hugging Face key tables: which HF tensor becomes which llava_jax parameter, and how.

Each `Rule` maps an HF key template (with `{i}` for a layer index) to one of our flat parameter paths; per-layer
HF tensors land in slice i of our stacked [layers, ...] parameter. Transforms: 'linear' (torch [out, in] ->
kernel [in, out]), 'conv' (torch OIHW -> HWIO), 'none'. The same tables run backwards for export.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping

import numpy as np

from llava_jax.convert.safetensors_io import CheckpointFormatError


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # template, e.g. "language_model.model.layers.{i}.self_attn.q_proj.weight"
    ours: str  # flat path, e.g. "language_model.q_kernel"
    transform: str = "none"

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf

    @property
    def pattern(self) -> re.Pattern:
        return re.compile("^" + re.escape(self.hf).replace(r"\{i\}", r"(\d+)") + "$")


def _to_ours(x: np.ndarray, transform: str) -> np.ndarray:
    if transform == "linear":
        return x.T
    if transform == "conv":
        return x.transpose(2, 3, 1, 0)
    return x


def _to_hf(x: np.ndarray, transform: str) -> np.ndarray:
    if transform == "linear":
        return np.ascontiguousarray(x.T)
    if transform == "conv":
        return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return np.ascontiguousarray(x).reshape(x.shape)  # ascontiguousarray makes 0-d arrays 1-d


def _encoder_rules(hf: str, ours: str) -> list[Rule]:
    layer = hf + "encoder.layers.{i}."
    rules = [Rule(layer + "layer_norm1.weight", ours + "encoder.ln1_scale"),
             Rule(layer + "layer_norm1.bias", ours + "encoder.ln1_bias"),
             Rule(layer + "layer_norm2.weight", ours + "encoder.ln2_scale"),
             Rule(layer + "layer_norm2.bias", ours + "encoder.ln2_bias")]
    for hf_name, our_name in [("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("out_proj", "o")]:
        rules.append(Rule(layer + f"self_attn.{hf_name}.weight", ours + f"encoder.{our_name}_kernel", "linear"))
        rules.append(Rule(layer + f"self_attn.{hf_name}.bias", ours + f"encoder.{our_name}_bias"))
    for fc in ("fc1", "fc2"):
        rules.append(Rule(layer + f"mlp.{fc}.weight", ours + f"encoder.{fc}_kernel", "linear"))
        rules.append(Rule(layer + f"mlp.{fc}.bias", ours + f"encoder.{fc}_bias"))
    return rules


def clip_vision_rules(hf: str, ours: str) -> list[Rule]:
    """Rules of a CLIP vision transformer whose HF keys start with `hf` (e.g. 'vision_tower.vision_model.')."""
    return [
        Rule(hf + "embeddings.patch_embedding.weight", ours + "patch_embedding", "conv"),
        Rule(hf + "embeddings.class_embedding", ours + "class_embedding"),
        Rule(hf + "embeddings.position_embedding.weight", ours + "position_embedding"),
        Rule(hf + "pre_layrnorm.weight", ours + "pre_layrnorm_scale"),
        Rule(hf + "pre_layrnorm.bias", ours + "pre_layrnorm_bias"),
        *_encoder_rules(hf, ours),
        Rule(hf + "post_layernorm.weight", ours + "post_layernorm_scale"),
        Rule(hf + "post_layernorm.bias", ours + "post_layernorm_bias"),
    ]


def clip_text_rules(hf: str, ours: str) -> list[Rule]:
    """Rules of a CLIP text transformer whose HF keys start with `hf` (e.g. 'text_model.')."""
    return [
        Rule(hf + "embeddings.token_embedding.weight", ours + "token_embedding"),
        Rule(hf + "embeddings.position_embedding.weight", ours + "position_embedding"),
        *_encoder_rules(hf, ours),
        Rule(hf + "final_layer_norm.weight", ours + "final_layer_norm_scale"),
        Rule(hf + "final_layer_norm.bias", ours + "final_layer_norm_bias"),
    ]


def clip_model_rules() -> list[Rule]:
    """Rules of a transformers `CLIPModel` checkpoint."""
    return [
        *clip_vision_rules("vision_model.", "vision_model."),
        *clip_text_rules("text_model.", "text_model."),
        Rule("visual_projection.weight", "visual_projection", "linear"),
        Rule("text_projection.weight", "text_projection", "linear"),
        Rule("logit_scale", "logit_scale"),
    ]


def llama_rules(hf_model: str, hf_head: str, ours: str) -> list[Rule]:
    """Rules of a LLaMA decoder: `hf_model` prefixes the decoder keys, `hf_head` is the lm_head weight key."""
    layer = hf_model + "layers.{i}."
    rules = [Rule(hf_model + "embed_tokens.weight", ours + "embed_tokens"),
             Rule(layer + "input_layernorm.weight", ours + "input_norm"),
             Rule(layer + "post_attention_layernorm.weight", ours + "post_norm"),
             Rule(hf_model + "norm.weight", ours + "norm"),
             Rule(hf_head, ours + "lm_head", "linear")]
    for p in ("q", "k", "v", "o"):
        rules.append(Rule(layer + f"self_attn.{p}_proj.weight", ours + f"{p}_kernel", "linear"))
        rules.append(Rule(layer + f"self_attn.{p}_proj.bias", ours + f"{p}_bias"))
    for p in ("gate", "up", "down"):
        rules.append(Rule(layer + f"mlp.{p}_proj.weight", ours + f"{p}_kernel", "linear"))
        rules.append(Rule(layer + f"mlp.{p}_proj.bias", ours + f"{p}_bias"))
    return rules


def projector_rules(hf: str = "multi_modal_projector.", ours: str = "projector.") -> list[Rule]:
    return [Rule(hf + "linear_1.weight", ours + "linear_1_kernel", "linear"),
            Rule(hf + "linear_1.bias", ours + "linear_1_bias"),
            Rule(hf + "linear_2.weight", ours + "linear_2_kernel", "linear"),
            Rule(hf + "linear_2.bias", ours + "linear_2_bias")]


def llava_repo_projector_rules(kind: str, hf: str = "model.mm_projector.", ours: str = "projector.") -> list[Rule]:
    """Rules of the PyTorch LLaVA repo's `mm_projector`: an `nn.Linear` ('linear': `{hf}weight`) or an
    `nn.Sequential(Linear, GELU, Linear)` ('mlp2x_gelu': `{hf}0.*`, `{hf}2.*`)."""
    if kind == "linear":
        return [Rule(hf + "weight", ours + "linear_1_kernel", "linear"), Rule(hf + "bias", ours + "linear_1_bias")]
    if kind == "mlp2x_gelu":
        return [Rule(hf + "0.weight", ours + "linear_1_kernel", "linear"), Rule(hf + "0.bias", ours + "linear_1_bias"),
                Rule(hf + "2.weight", ours + "linear_2_kernel", "linear"), Rule(hf + "2.bias", ours + "linear_2_bias")]
    raise CheckpointFormatError(f"no key table for projector {kind!r}")


def llava_rules() -> list[Rule]:
    """Rules of a transformers `LlavaForConditionalGeneration` checkpoint in the classic on-disk layout."""
    return [*clip_vision_rules("vision_tower.vision_model.", "vision_tower."), *projector_rules(),
            *llama_rules("language_model.model.", "language_model.lm_head.weight", "language_model.")]


def llama_causal_lm_rules(ours: str = "language_model.") -> list[Rule]:
    """Rules of a transformers `LlamaForCausalLM` checkpoint (used by `convert compose`)."""
    return llama_rules("model.", "lm_head.weight", ours)


# Buffers some transformers versions write that carry no weights.
IGNORED = re.compile(r"(position_ids|rotary_emb\.inv_freq|num_batches_tracked)$")


def canonical_llava_key(key: str) -> str:
    """Maps the in-memory layout of current transformers (`model.language_model.*`, `model.vision_tower.*`,
    `model.multi_modal_projector.*`, `lm_head.*`) onto the classic on-disk layout; classic keys pass through."""
    for new, old in (("model.language_model.", "language_model.model."),
                     ("model.vision_tower.", "vision_tower."),
                     ("model.multi_modal_projector.", "multi_modal_projector."),
                     ("lm_head.", "language_model.lm_head.")):
        if key.startswith(new):
            key = old + key[len(new):]
            break
    # transformers v5 drops the inner `vision_model.` of the vision tower (in memory and on disk)
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        key = "vision_tower.vision_model." + key[len("vision_tower."):]
    return key


def hf_to_ours(tensors: Mapping[str, np.ndarray], rules: Iterable[Rule], expected: Mapping[str, tuple],
               dtype: np.dtype, strict: bool = True) -> dict[str, np.ndarray]:
    """Converts HF tensors into our flat parameters.

    Args:
      tensors: {HF key: array} (already canonical).
      rules: the key table.
      expected: {our path: shape} of the model being loaded; rules whose target is absent (an unused bias,
        a tied head) are skipped, and HF tensors for them count as unexpected.
      dtype: the dtype of the returned arrays.
      strict: raise on any unexpected HF key or missing parameter.
    Returns:
      {our path: array of the expected shape}.
    """
    rules = [r for r in rules if r.ours in expected]
    compiled = [(r, r.pattern) for r in rules]
    out: dict[str, np.ndarray] = {}
    filled: dict[str, set[int]] = {}
    unexpected = []
    for key, value in tensors.items():
        if IGNORED.search(key):
            continue
        for rule, pat in compiled:
            m = pat.match(key)
            if not m:
                continue
            shape = tuple(expected[rule.ours])
            arr = _to_ours(np.asarray(value), rule.transform)
            if rule.stacked:
                i = int(m.group(1))
                if i >= shape[0]:
                    raise CheckpointFormatError(f"{key}: layer {i} but the config has {shape[0]} layers")
                if tuple(arr.shape) != shape[1:]:
                    raise CheckpointFormatError(f"{key}: shape {arr.shape} does not fit {rule.ours}{list(shape)}")
                buf = out.setdefault(rule.ours, np.zeros(shape, dtype))
                buf[i] = arr
                filled.setdefault(rule.ours, set()).add(i)
            else:
                if tuple(arr.shape) != shape:
                    raise CheckpointFormatError(f"{key}: shape {arr.shape} does not fit {rule.ours}{list(shape)}")
                out[rule.ours] = arr.astype(dtype)
            break
        else:
            unexpected.append(key)
    missing = [k for k in expected if k not in out]
    partial = [f"{k} (layers {sorted(set(range(expected[k][0])) - v)[:5]})"
               for k, v in filled.items() if len(v) != expected[k][0]]
    if strict and (unexpected or missing or partial):
        raise CheckpointFormatError(
            "checkpoint does not match the model: "
            + (f"unexpected HF keys {sorted(unexpected)[:10]}{'...' if len(unexpected) > 10 else ''}; " if unexpected else "")
            + (f"missing parameters {missing[:10]}; " if missing else "")
            + (f"incomplete layer stacks {partial}" if partial else ""))
    return out


def ours_to_hf(params: Mapping[str, np.ndarray], rules: Iterable[Rule], dtype: np.dtype | None = None
               ) -> dict[str, np.ndarray]:
    """Converts our flat parameters into HF tensors (stacked parameters split per layer).

    Raises CheckpointFormatError if a parameter has no rule."""
    by_ours = {r.ours: r for r in rules}
    out: dict[str, np.ndarray] = {}
    for path, value in params.items():
        if path not in by_ours:
            raise CheckpointFormatError(f"parameter {path} has no Hugging Face key")
        rule = by_ours[path]
        arr = np.asarray(value)
        if dtype is not None:
            arr = arr.astype(dtype)
        if rule.stacked:
            for i in range(arr.shape[0]):
                out[rule.hf.format(i=i)] = _to_hf(arr[i], rule.transform)
        else:
            out[rule.hf] = _to_hf(arr, rule.transform)
    return out
