"""python -m llava_jax.convert {from-hf, from-llava, compose, to-hf, clip-to-hf, to-peft, from-peft}

  python -m llava_jax.convert from-hf HF_LLAVA_DIR OUT_DIR
  python -m llava_jax.convert from-llava LLAVA_DIR --vision CLIP_DIR OUT_DIR   (PyTorch LLaVA repo checkpoint)
  python -m llava_jax.convert compose --vision CLIP_DIR --text LLAMA_DIR --projector mlp2x_gelu OUT_DIR
      [--projector-weights mm_projector.bin]   (a stage-1 projector of the PyTorch LLaVA repo)
  python -m llava_jax.convert to-hf MODEL_OR_WORKDIR OUT_HF_DIR [--dtype bfloat16]   (LoRA adapters merged)
  python -m llava_jax.convert to-peft WORKDIR OUT_PEFT_DIR [--base-name HF_BASE]     (a LoRA run's adapters)
  python -m llava_jax.convert from-peft PEFT_DIR --base MODEL OUT_DIR [--merge]     (PEFT / LLaVA LoRA adapter)
  python -m llava_jax.convert clip-to-hf CLIP_WORKDIR_OR_DIR OUT_HF_DIR [--dtype float32]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

from llava_jax import cli


def _layers(text: str) -> int | tuple[int, ...]:
    parts = [int(x) for x in text.split(",")]
    return parts[0] if len(parts) == 1 else tuple(parts)


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m llava_jax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("from-hf", help="HF LlavaForConditionalGeneration dir -> llava_jax model dir")
    a.add_argument("hf_dir")
    a.add_argument("out_dir")
    a.add_argument("--image-aspect", choices=("pad", "crop"), default="crop",
                   help="crop = what transformers' processor does; pad = LLaVA-1.5's own training preprocessing")
    a.add_argument("--template", default=None, help="conversation template to record (default: tokenizer's)")
    r = sub.add_parser("from-llava", help="PyTorch LLaVA repo checkpoint (LlavaLlamaForCausalLM) + CLIP dir -> "
                                          "llava_jax model dir")
    r.add_argument("llava_dir")
    r.add_argument("--vision", default=None,
                   help="CLIP directory of the vision tower (default: the config's mm_vision_tower if local)")
    r.add_argument("--pad-vocab-to", type=int, default=64, help="pad the vocabulary to a multiple (0: no)")
    r.add_argument("--template", default="vicuna_v1", help="conversation template (LLaVA-1.5: vicuna_v1)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("out_dir")
    c = sub.add_parser("compose", help="CLIP dir + LLaMA dir -> stage-1 starting model dir")
    c.add_argument("--vision", required=True)
    c.add_argument("--text", required=True)
    c.add_argument("--projector", choices=("linear", "mlp2x_gelu"), default=None,
                   help="default: mlp2x_gelu, or the kind stored in --projector-weights")
    c.add_argument("--projector-weights", default=None,
                   help="stage-1 mm_projector.bin / .safetensors (LLaVA's --pretrain_mm_mlp_adapter)")
    c.add_argument("--vision-feature-layer", type=_layers, default=-2)
    c.add_argument("--vision-feature-select-strategy", choices=("default", "full"), default="default")
    c.add_argument("--image-aspect", choices=("pad", "crop"), default="pad")
    c.add_argument("--pad-vocab-to", type=int, default=64, help="pad the vocabulary to a multiple (0: no)")
    c.add_argument("--template", default="vicuna_v1")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("out_dir")
    t = sub.add_parser("to-hf", help="llava_jax model dir / workdir / HF dir -> HF LLaVA dir")
    t.add_argument("model")
    t.add_argument("out_dir")
    t.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None)
    t.add_argument("--max-shard-gb", type=float, default=2.0)
    k = sub.add_parser("clip-to-hf", help="llava_jax.clip_train workdir (or HF CLIP dir) -> HF CLIPModel dir")
    k.add_argument("model")
    k.add_argument("out_dir")
    k.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    e = sub.add_parser("to-peft", help="LoRA workdir / model dir -> PEFT adapter dir (+ LLaVA's projector file)")
    e.add_argument("model")
    e.add_argument("out_dir")
    e.add_argument("--base-name", default=None, help="recorded as base_model_name_or_path (the HF base dir)")
    f = sub.add_parser("from-peft", help="PEFT LoRA adapter dir (ours or LLaVA's) + base model -> model dir")
    f.add_argument("peft_dir")
    f.add_argument("--base", required=True, help="the model the adapter was trained on (any model path)")
    f.add_argument("--merge", action="store_true", help="merge the adapters into the weights (a plain model)")
    f.add_argument("out_dir")
    args = p.parse_args(argv)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    """Runs a parsed command. Directory arguments may be gs://: input directories are read through local copies
    (model paths through `load_model`), the output directory is written locally and uploaded when complete."""
    from llava_jax.io import is_remote, local_copy, staged_dir

    out_name = args.out_dir
    with contextlib.ExitStack() as stack:
        for name in ("hf_dir", "llava_dir", "vision", "text", "peft_dir", "projector_weights"):
            value = getattr(args, name, None)
            if value and is_remote(value) and name == "projector_weights":
                from llava_jax.io import download_file

                local = stack.enter_context(local_copy_of_file(value))
                download_file(value, local)
                setattr(args, name, str(local))
            elif value and is_remote(value):
                setattr(args, name, str(stack.enter_context(local_copy(value))))
        args.out_dir = str(stack.enter_context(staged_dir(out_name)))
        _dispatch(args, out_name)
    return 0


@contextlib.contextmanager
def local_copy_of_file(uri: str):
    """A temporary local path named like `uri`'s file (removed on exit)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="llava_jax_file_") as tmp:
        yield Path(tmp) / uri.rstrip("/").rsplit("/", 1)[-1]


def _dispatch(args: argparse.Namespace, out_name: str) -> None:
    from llava_jax.convert.model_dir import load_hf_llava, load_model, save_model_dir

    if args.command == "from-hf":
        loaded = load_hf_llava(args.hf_dir, aspect=args.image_aspect)
        save_model_dir(args.out_dir, loaded.model, loaded.config, loaded.tokenizer, loaded.image_config,
                       template=args.template or loaded.template, source_dtype=loaded.source_dtype)
        print(f"wrote {out_name}")
    elif args.command == "clip-to-hf":
        from llava_jax.convert.clip_export import clip_to_hf

        clip_to_hf(args.model, args.out_dir, dtype=args.dtype)
        print(f"wrote {out_name}")
    elif args.command == "compose":
        from llava_jax.convert.compose import compose

        compose(args.vision, args.text, args.out_dir, args.projector,
                vision_feature_layer=args.vision_feature_layer,
                vision_feature_select_strategy=args.vision_feature_select_strategy,
                image_aspect=args.image_aspect, pad_to_multiple_of=args.pad_vocab_to, template=args.template,
                seed=args.seed, projector_weights=args.projector_weights)
        print(f"wrote {out_name}")
    elif args.command == "to-peft":
        from llava_jax.convert.peft_io import export_peft

        export_peft(load_model(args.model), args.out_dir, base_model=args.base_name)
        print(f"wrote {out_name}")
    elif args.command == "from-peft":
        from llava_jax.convert.params import flat_params, to_numpy
        from llava_jax.convert.peft_io import import_peft
        from llava_jax.models import lora

        loaded = import_peft(args.peft_dir, args.base)
        spec = lora.lora_spec_of(loaded.model)
        params = lora.merge_flat(to_numpy(flat_params(loaded.model)), spec) if args.merge else None
        save_model_dir(args.out_dir, loaded.model, loaded.config, loaded.tokenizer, loaded.image_config,
                       template=loaded.template, source_dtype=loaded.source_dtype, params=params,
                       lora_spec=None if args.merge else spec)
        print(f"wrote {out_name}")
    elif args.command == "from-llava":
        from llava_jax.convert.llava_repo import convert_llava_repo

        convert_llava_repo(args.llava_dir, args.out_dir, args.vision, pad_to_multiple_of=args.pad_vocab_to,
                           template=args.template, seed=args.seed)
        print(f"wrote {out_name}")
    else:
        from llava_jax.convert.export import export_hf

        loaded = load_model(args.model)
        export_hf(loaded, args.out_dir, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 1024**3))
        print(f"wrote {out_name}")


if __name__ == "__main__":
    sys.exit(cli.run(main))
