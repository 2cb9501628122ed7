"""PEFT LoRA adapter directories <-> llava_jax models with adapters (`convert to-peft` / `convert from-peft`).

A PEFT LoRA directory (what `peft.PeftModel.save_pretrained` writes and `PeftModel.from_pretrained` reads):
  adapter_config.json          peft_type LORA, r, lora_alpha, lora_dropout, target_modules, modules_to_save, ...
  adapter_model.safetensors    `base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r] per
                               adapted torch Linear; modules_to_save copies as `base_model.model.<module>.<param>`
  non_lora_trainables.bin      LLaVA's LoRA runs: the trained projector, `base_model.model.model.mm_projector.*`

`to-peft` targets the HF `LlavaForConditionalGeneration` that `convert to-hf` writes: adapters under
`model.language_model.layers.N.{self_attn,mlp}.*_proj`, the projector as a module to save
(`model.multi_modal_projector`), so `PeftModel.from_pretrained(hf_base, dir)` gives our model; it also writes
`non_lora_trainables.bin` as LLaVA does. `from-peft` reads such a directory or one saved by LLaVA's LoRA training
(`base_model.model.model.layers.N...`, with `non_lora_trainables.bin`) onto a base model, for further training
(adapters kept) or merged.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from llava_jax.convert import hf_keys
from llava_jax.convert.params import flat_params, to_numpy
from llava_jax.convert.safetensors_io import CheckpointFormatError
from llava_jax.io import atomic_write_json, read_json
from llava_jax.models import lora

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILES = ("adapter_model.safetensors", "adapter_model.bin")
NON_LORA_FILE = "non_lora_trainables.bin"
HF_LAYER_PREFIX = "base_model.model.model.language_model.layers."
HF_PROJECTOR_PREFIX = "base_model.model.model.multi_modal_projector."
LLAVA_PROJECTOR_PREFIX = "base_model.model.model.mm_projector."
# PEFT target_modules (a regex, full match): the decoder's linear layers, never the vision tower's.
_MODULE_RX = {t: m.replace(".", r"\.") for t, m in lora.HF_MODULES.items()}

# An adapter tensor of a decoder layer, in any of the layouts: HF LLaVA (model.language_model.layers, or the classic
# language_model.model.layers), LLaVA repo / plain LLaMA (model.layers); adapter name optional (`lora_A.default`).
_ADAPTER_KEY = re.compile(
    r"^base_model\.model\.(?:model\.language_model\.|language_model\.model\.|model\.)layers\.(?P<layer>\d+)\."
    r"(?P<module>self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$")
_MODULE_TO_TARGET = {m: t for t, m in lora.HF_MODULES.items()}


class PeftFormatError(CheckpointFormatError):
    """A PEFT directory that is not a LoRA adapter of a LLaVA / LLaMA decoder this tool can read."""


def target_modules_regex(targets: tuple[str, ...]) -> str:
    """The PEFT `target_modules` regex for our targets (decoder layers only)."""
    alts = "|".join(_MODULE_RX[t] for t in targets)
    return r"^(?!.*vision_tower).*layers\.\d+\.(" + alts + r")$"


# ------------------------------------------------------------------------------------------------ to-peft


def export_peft(loaded: Any, out_dir: str | os.PathLike, *, base_model: str | None = None) -> Path:
    """Writes the adapters (and the projector) of a model with LoRA as a PEFT directory.

    `loaded`: a LoadedModel whose language model has adapters. `base_model` is recorded as
    base_model_name_or_path (the HF directory `convert to-hf` wrote for the base). Raises PeftFormatError
    when the model has no adapters."""
    spec = lora.lora_spec_of(loaded.model)
    if spec is None:
        raise PeftFormatError("the model has no LoRA adapters (train with a *_lora config, or convert from-peft)")
    if loaded.config.projector != "mlp2x_gelu":
        raise PeftFormatError(f"transformers' LLaVA has only the 2-layer projector; this model uses "
                              f"{loaded.config.projector!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = to_numpy(flat_params(loaded.model))
    tensors: dict[str, np.ndarray] = {}
    for t in spec.targets:
        a_name, b_name = lora.adapter_names(t)
        a, b = params[f"language_model.{a_name}"], params[f"language_model.{b_name}"]
        for i in range(a.shape[0]):
            module = f"{HF_LAYER_PREFIX}{i}.{lora.HF_MODULES[t]}"
            tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(a[i].T.astype(np.float32))
            tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(b[i].T.astype(np.float32))
    projector = {k: v for k, v in params.items() if k.startswith("projector.")}
    hf_projector = hf_keys.ours_to_hf(projector, hf_keys.projector_rules(), np.dtype(np.float32))
    for k, v in hf_projector.items():  # multi_modal_projector.linear_1.weight -> a module to save
        tensors[HF_PROJECTOR_PREFIX + k[len("multi_modal_projector."):]] = v
    from safetensors.numpy import save_file

    tmp = out / "adapter_model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "adapter_model.safetensors")
    _write_non_lora_trainables(out / NON_LORA_FILE, projector)
    atomic_write_json(out / CONFIG_FILE, {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": target_modules_regex(spec.targets),
        "modules_to_save": ["multi_modal_projector"],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "auto_mapping": {"base_model_class": "LlavaForConditionalGeneration",
                         "parent_library": "transformers.models.llava.modeling_llava"},
    })
    return out


def _write_non_lora_trainables(path: Path, projector: dict[str, np.ndarray]) -> None:
    """LLaVA's `non_lora_trainables.bin`: the projector as torch tensors keyed base_model.model.model.mm_projector.*"""
    try:
        import torch
    except ImportError as e:  # torch is the conversion extra's
        raise PeftFormatError(f"writing {path.name} (LLaVA's projector file) needs torch: {e}") from None
    rules = hf_keys.llava_repo_projector_rules("mlp2x_gelu", hf=LLAVA_PROJECTOR_PREFIX)
    tensors = hf_keys.ours_to_hf(projector, rules, np.dtype(np.float32))
    tmp = path.with_suffix(".bin.tmp")
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ from-peft


def read_adapter_config(directory: Path) -> lora.LoraSpec:
    """adapter_config.json -> LoraSpec (targets from the tensors are checked against it later)."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise PeftFormatError(f"{directory} has no {CONFIG_FILE}: not a PEFT adapter directory")
    c = read_json(path)
    if c.get("peft_type") != "LORA":
        raise PeftFormatError(f"{path}: peft_type {c.get('peft_type')!r} is not LORA")
    unsupported = [name for name, bad in (
        ("use_dora", bool(c.get("use_dora"))), ("use_rslora", bool(c.get("use_rslora"))),
        ("rank_pattern", bool(c.get("rank_pattern"))), ("alpha_pattern", bool(c.get("alpha_pattern"))),
        ("fan_in_fan_out", bool(c.get("fan_in_fan_out"))), ("bias", c.get("bias", "none") != "none"),
        ("lora_bias", bool(c.get("lora_bias")))) if bad]
    if unsupported:
        raise PeftFormatError(f"{path}: {', '.join(unsupported)} set; only plain LoRA (scale alpha / r) is supported")
    try:
        return lora.LoraSpec(rank=int(c["r"]), alpha=float(c["lora_alpha"]), dropout=float(c.get("lora_dropout", 0.0)))
    except (KeyError, TypeError) as e:
        raise PeftFormatError(f"{path}: missing or bad field {e}") from None


def read_adapter_weights(directory: Path) -> dict[str, np.ndarray]:
    """adapter_model.safetensors (or a weights-only adapter_model.bin)."""
    from llava_jax.convert.torch_bin import read_weights_file

    for name in WEIGHTS_FILES:
        if (directory / name).is_file():
            return {k: np.asarray(v, np.float32) for k, v in read_weights_file(directory / name).items()}
    raise PeftFormatError(f"{directory} has none of {', '.join(WEIGHTS_FILES)}")


def adapters_from_peft(tensors: dict[str, np.ndarray], rank: int, num_layers: int,
                       shapes: dict[str, tuple[int, int]]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray],
                                                                    tuple[str, ...]]:
    """Splits PEFT tensors into our stacked adapters and the projector tensors.

    shapes: {target: (in, out)} of the base's kernels. Returns ({'language_model.q_lora_a': [Lyr, in, r], ...},
    {HF projector key: array}, targets). Raises PeftFormatError on unknown keys, partial stacks or shapes."""
    stacks: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    projector: dict[str, np.ndarray] = {}
    unexpected = []
    for key, value in tensors.items():
        m = _ADAPTER_KEY.match(key)
        if m:
            stacks.setdefault((_MODULE_TO_TARGET[m["module"]], m["ab"]), {})[int(m["layer"])] = value
        elif key.startswith(HF_PROJECTOR_PREFIX):
            projector["multi_modal_projector." + key[len(HF_PROJECTOR_PREFIX):]] = value
        else:
            unexpected.append(key)
    if unexpected:
        raise PeftFormatError(f"adapter tensors this tool cannot place (only decoder-layer LoRA and the projector): "
                              f"{sorted(unexpected)[:5]}")
    targets = tuple(t for t in lora.TARGETS if (t, "A") in stacks or (t, "B") in stacks)
    if not targets:
        raise PeftFormatError("the adapter holds no LoRA tensors of decoder layers")
    out = {}
    for t in targets:
        d_in, d_out = shapes[t]
        for ab, want in (("A", (rank, d_in)), ("B", (d_out, rank))):
            layers = stacks.get((t, ab), {})
            if sorted(layers) != list(range(num_layers)):
                missing = sorted(set(range(num_layers)) - set(layers))[:5]
                raise PeftFormatError(f"lora_{ab} of {lora.HF_MODULES[t]}: layers {missing} missing or extra "
                                      f"(the base has {num_layers})")
            for i, v in layers.items():
                if tuple(v.shape) != want:
                    raise PeftFormatError(f"lora_{ab} of layer {i} {lora.HF_MODULES[t]}: shape {tuple(v.shape)}, "
                                          f"expected {want} (r={rank}, base {d_in} -> {d_out})")
            stacked = np.stack([layers[i].T for i in range(num_layers)])
            out[f"language_model.{t}_lora_{ab.lower()}"] = stacked
    return out, projector, targets


def import_peft(peft_dir: str | os.PathLike, base: str | os.PathLike) -> Any:
    """Loads `base` (any model path `convert` reads) and puts the PEFT adapter of `peft_dir` on it.

    The projector comes from the adapter's modules to save or from LLaVA's non_lora_trainables.bin beside it
    (when present); the base's projector is kept otherwise. Returns the LoadedModel with adapters."""
    import jax.numpy as jnp
    from flax import nnx

    from llava_jax.convert.llava_repo import projector_params, read_projector_file
    from llava_jax.convert.model_dir import load_model

    directory = Path(peft_dir)
    spec = read_adapter_config(directory)
    tensors = read_adapter_weights(directory)
    loaded = load_model(base)
    llm = loaded.model.language_model
    if lora.lora_spec_of(loaded.model) is not None:
        raise PeftFormatError(f"the base {base} already has LoRA adapters; give the model they were trained on")
    shapes = {t: tuple(getattr(llm, f"{t}_kernel").shape[1:]) for t in lora.TARGETS}
    adapters, hf_projector, targets = adapters_from_peft(tensors, spec.rank, llm.config.num_hidden_layers, shapes)
    spec = lora.LoraSpec(rank=spec.rank, alpha=spec.alpha, dropout=spec.dropout, targets=targets)
    lora.add_lora(llm, spec)
    for path, value in adapters.items():
        getattr(llm, path.split(".")[-1]).set_value(jnp.asarray(value, jnp.float32))
    cfg = loaded.config
    projector = None
    if hf_projector:
        expected = {k: tuple(v.shape) for k, v in flat_params(loaded.model).items() if k.startswith("projector.")}
        projector = hf_keys.hf_to_ours(hf_projector, hf_keys.projector_rules(), expected, np.dtype(np.float32))
    elif (directory / NON_LORA_FILE).is_file():
        kind, raw = read_projector_file(directory / NON_LORA_FILE)
        if kind != cfg.projector:
            raise PeftFormatError(f"{NON_LORA_FILE} holds a {kind} projector, the base has {cfg.projector}")
        in_dim = cfg.vision.hidden_size * len(cfg.feature_layers)
        projector = projector_params(raw, kind, in_dim, cfg.text.hidden_size, source=str(directory / NON_LORA_FILE))
    if projector:
        state = nnx.state(loaded.model.projector, nnx.Param)
        for p, v in nnx.to_flat_state(state):
            v.set_value(jnp.asarray(projector["projector." + ".".join(map(str, p))], v.get_value().dtype))
    return loaded
