"""Export to a Hugging Face `LlavaForConditionalGeneration` directory.

Writes the classic key layout as sharded safetensors with an index, config.json, generation_config.json, the
tokenizer, and a `LlavaProcessor` (image processor + `<image>` expansion + a chat template rendering the
model's conversation template), so `LlavaForConditionalGeneration.from_pretrained(dir)` and
`AutoProcessor.from_pretrained(dir)` load it as they are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from llava_jax.convert import hf_keys
from llava_jax.convert.model_dir import LoadedModel
from llava_jax.convert.params import flat_params, to_numpy
from llava_jax.convert.safetensors_io import write_sharded
from llava_jax.io import atomic_write_json
from llava_jax.models import lora

_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": "bfloat16"}


class ExportError(ValueError):
    """The model cannot be expressed as a transformers LLaVA checkpoint."""


def _np_dtype(name: str):
    import ml_dtypes

    if name not in _DTYPES:
        raise ExportError(f"unsupported export dtype {name!r}; choose float32, float16 or bfloat16")
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(_DTYPES[name])


def chat_template_for(template_name: str) -> str | None:
    """A Jinja chat template that renders messages the way our conversation template `template_name` does
    (images, given as {"type": "image"} content items, become "<image>\\n" before the text)."""
    from llava_jax.data import conversation

    try:
        t = conversation.get_template(template_name)
    except KeyError:
        return None
    if t.use_tokenizer_template:
        return None

    def lit(s: str) -> str:
        return json.dumps(s)

    user_pre, user_post = t.user_format.split("{content}")
    ans_pre, ans_post = t.answer_format.split("{content}")
    sys_pre, sys_post = t.system_format.split("{system}")
    image_text = "<image>" if t.image_only_prompt else "<image>\n"
    return (
        "{%- set ns = namespace(system=" + lit(t.system) + ") -%}"
        "{%- for m in messages if m['role'] == 'system' -%}"
        "{%- set ns.system = m['content'] if m['content'] is string else m['content'][0]['text'] -%}"
        "{%- endfor -%}"
        "{%- if ns.system -%}{{ " + lit(sys_pre) + " + ns.system + " + lit(sys_post) + " }}{%- endif -%}"
        "{%- for m in messages if m['role'] != 'system' -%}"
        "{%- if m['content'] is string -%}{%- set text = m['content'] -%}{%- else -%}"
        "{%- set text = namespace(v='') -%}"
        "{%- for c in m['content'] if c['type'] == 'image' -%}{%- set text.v = text.v + " + lit(image_text) + " -%}"
        "{%- endfor -%}"
        "{%- for c in m['content'] if c['type'] == 'text' -%}{%- set text.v = text.v + c['text'] -%}{%- endfor -%}"
        "{%- set text = text.v -%}{%- endif -%}"
        "{%- if m['role'] == 'user' -%}{{ " + lit(user_pre) + " + text + " + lit(user_post) + " }}"
        "{%- else -%}{{ " + lit(ans_pre) + " + text + " + lit(ans_post) + " }}{%- endif -%}"
        "{%- endfor -%}"
    )


def export_hf(loaded: LoadedModel, out_dir: str | os.PathLike, dtype: str | None = None,
              max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Writes `loaded` as a transformers LLaVA directory; `dtype` defaults to the dtype the model came in.
    LoRA adapters are merged into the base weights, so the result is a plain LLaVA."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    cfg = loaded.config
    if cfg.projector != "mlp2x_gelu":
        raise ExportError(f"transformers' LLaVA has only the 2-layer projector; this model uses {cfg.projector!r}")
    dtype = dtype or loaded.source_dtype or "float32"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = to_numpy(flat_params(loaded.model))
    spec = lora.lora_spec_of(loaded.model)
    if spec is not None:  # LoRA: the adapters are merged into the base kernels (W + alpha / r * A @ B)
        params = lora.merge_flat(params, spec)
    tensors = hf_keys.ours_to_hf(params, hf_keys.llava_rules(), _np_dtype(dtype))
    write_sharded(out, tensors, max_shard_bytes=max_shard_bytes)
    config = cfg.to_hf()
    config["dtype"] = dtype
    config["text_config"]["dtype"] = dtype
    atomic_write_json(out / "config.json", config)
    text = cfg.text
    atomic_write_json(out / "generation_config.json", {
        "bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id,
        "pad_token_id": cfg.pad_token_id if cfg.pad_token_id is not None else text.pad_token_id})
    tok = loaded.tokenizer
    if tok is None:
        return out
    chat_template = chat_template_for(loaded.template) or getattr(tok, "chat_template", None)
    image_kw = loaded.image_config.to_preprocessor_config() if loaded.image_config is not None else {}
    image_kw.pop("image_processor_type", None)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(**image_kw) if image_kw else CLIPImageProcessor(),
        tokenizer=tok,
        patch_size=cfg.vision.patch_size,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        image_token=tok.convert_ids_to_tokens(cfg.image_token_id),
        chat_template=chat_template,
    )
    processor.save_pretrained(str(out))
    return out
