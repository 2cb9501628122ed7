"""Tiny models and tokenizers built offline, for tests, benchmarks and the demo.

Nothing here downloads anything. `build_tokenizer` trains a LLaMA-like BPE tokenizer on the texts it is given;
the `make_hf_*` helpers (which need torch) write random Hugging Face CLIP / LLaMA / LLaVA models to a directory
exactly as `save_pretrained` does, so the real loading code can be tested on them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"

_BASE_TEXTS = [
    "USER: ASSISTANT: Human: Assistant: ### A chat between a curious human and an artificial intelligence assistant.",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 ? ! , . : ; ( ) [ ] - ' \" / A B C D E",
    "What is shown in the image? Describe this image in detail. There is a red circle on the left.",
]


def build_tokenizer(
    texts: Iterable[str] = (),
    vocab_size: int = 512,
    out_dir: str | os.PathLike | None = None,
    add_image_and_pad: bool = True,
    chat_template: str | None = None,
):
    """Trains a LLaMA-like BPE tokenizer offline and wraps it as a transformers fast tokenizer.

    Layout of the ids: `<unk>`=0, `<s>`=1, `</s>`=2, then the learned vocabulary (with every single byte-level
    character of the training texts), then `<image>` and `<pad>` when `add_image_and_pad` is set. Text is
    normalised by replacing spaces with "▁" and prefixing one "▁" (the metaspace scheme of SentencePiece LLaMA
    tokenizers); encoding adds `<s>` at the start.

    Args:
      texts: training texts (a few fixed sentences are always added so common template words exist).
      vocab_size: target vocabulary size before the added special tokens.
      out_dir: if given, the tokenizer is saved there with `save_pretrained`.
      add_image_and_pad: append `<image>` and `<pad>` as special tokens.
      chat_template: optional Jinja chat template stored with the tokenizer.
    Returns:
      a `transformers.PreTrainedTokenizerFast`.
    """
    from transformers import AddedToken, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        show_progress=False,
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!'\"()[]-/#<>_▁\n"),
    )
    tok.train_from_iterator(list(_BASE_TEXTS) + list(texts), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        padding_side="left",
    )
    if add_image_and_pad:
        fast.add_special_tokens(
            {
                "pad_token": AddedToken(PAD_TOKEN, special=True, normalized=False),
                "additional_special_tokens": [AddedToken(IMAGE_TOKEN, special=True, normalized=False)],
            }
        )
    if chat_template is not None:
        fast.chat_template = chat_template
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def build_clip_tokenizer(texts: Iterable[str], vocab_size: int = 1024, out_dir: str | os.PathLike | None = None):
    """Learns a CLIP-style byte-level BPE offline and returns it as a transformers `CLIPTokenizer`.

    Words are cut by transformers' own CLIPTokenizer pipeline (NFC, whitespace squeezed, lower case, CLIP's word
    split, byte-level symbols, "</w>" on a word's last symbol), so `CLIPTokenizer` / `CLIPProcessor` load the
    saved files as they load openai/clip-*. Merges are learned by plain BPE: repeatedly the most frequent
    adjacent pair (ties broken by the symbols' order, so the result is a function of the texts alone -- the
    `tokenizers` trainer breaks ties differently from run to run), until `vocab_size` or no pair occurs twice.
    Cost: one pass over the distinct words per merge (seconds for a caption vocabulary of a few thousand words).

    Layout of the ids: the 256 byte symbols, the same with "</w>", the merges in order, then `<|startoftext|>` and
    `<|endoftext|>` (the highest ids, as in CLIP; `<|endoftext|>` is also the pad and unknown token). Every text
    becomes [bos, ..., eos]; no byte is ever unknown.

    Args:
      texts: training texts (captions).
      vocab_size: vocabulary size before the two special tokens (at least 512: the byte symbols).
      out_dir: if given, the tokenizer is saved there with `save_pretrained`.
    Returns:
      a `transformers.CLIPTokenizer`.
    """
    from collections import Counter

    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    base = alphabet + [a + "</w>" for a in alphabet]
    pipeline = CLIPTokenizer(vocab={CLIP_BOS: 0, CLIP_EOS: 1}, merges=[]).backend_tokenizer
    chunks = Counter(chunk for text in texts for chunk in text.split())  # no word spans whitespace
    pieces: Counter = Counter()
    for chunk, n in chunks.items():
        for piece, _ in pipeline.pre_tokenizer.pre_tokenize_str(pipeline.normalizer.normalize_str(chunk)):
            pieces[piece] += n
    words = [[list(w[:-1]) + [w[-1] + "</w>"], n] for w, n in sorted(pieces.items()) if w]
    merges: list[tuple[str, str]] = []
    vocab = {sym: i for i, sym in enumerate(base)}
    while len(vocab) < vocab_size:
        pairs: Counter = Counter()
        for symbols, n in words:
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += n
        if not pairs:
            break
        pair, count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if count < 2:
            break
        merges.append(pair)
        vocab.setdefault(pair[0] + pair[1], len(vocab))
        for word in words:
            if len(word[0]) > 1:
                word[0] = _merge_pair(word[0], pair)
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    clip_tok = CLIPTokenizer(vocab=vocab, merges=merges)
    if out_dir is not None:
        clip_tok.save_pretrained(str(out_dir))
    return clip_tok


# ------------------------------------------------------------------------------------------------ HF (torch) models


def tiny_clip_vision_kwargs(**overrides: Any) -> dict[str, Any]:
    """Keyword arguments of a tiny `CLIPVisionConfig` (image 32, patch 8 -> 16 patches)."""
    kw = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=24,
        layer_norm_eps=1e-5,
        hidden_act="quick_gelu",
    )
    kw.update(overrides)
    return kw


def tiny_llama_kwargs(vocab_size: int, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments of a tiny `LlamaConfig` with grouped-query attention."""
    kw = dict(
        vocab_size=vocab_size,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return kw


def _seed_and_randomise(model, seed: int, std: float = 0.5) -> None:
    """Re-initialises every floating parameter of a torch model with N(0, std / sqrt(fan_in))-ish values so
    parity tests exercise non-trivial weights (HF initialises norms to 1 and biases to 0)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point():
                continue
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) * (std / fan_in**0.5) * 2.0)
            elif "norm" in name or "layrnorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def make_hf_clip(out_dir: str | os.PathLike | None, seed: int = 0, text_vocab: int = 99, **vision_overrides: Any):
    """Builds a random `CLIPModel` (vision + text towers) and saves it (safetensors) when out_dir is given."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    vision = tiny_clip_vision_kwargs(**vision_overrides)
    text = dict(
        vocab_size=text_vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        projection_dim=vision["projection_dim"],
        hidden_act="quick_gelu",
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=vision["projection_dim"])
    model = CLIPModel(cfg).eval()
    _seed_and_randomise(model, seed)
    if out_dir is not None:
        model.save_pretrained(str(out_dir))
        clip_image_processor(vision["image_size"]).save_pretrained(str(out_dir))
    return model


def clip_image_processor(size: int):
    """A `CLIPImageProcessor` with CLIP's mean/std at the given size (shortest edge resize + centre crop)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_center_crop=True,
        do_resize=True,
        do_normalize=True,
        do_rescale=True,
        do_convert_rgb=True,
    )


def make_hf_llama(out_dir: str | os.PathLike | None, tokenizer=None, seed: int = 0, **overrides: Any):
    """Builds a random `LlamaForCausalLM` (and saves it with `tokenizer` when out_dir is given)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    vocab = overrides.pop("vocab_size", len(tokenizer) if tokenizer is not None else 128)
    cfg = LlamaConfig(**tiny_llama_kwargs(vocab, **overrides))
    model = LlamaForCausalLM(cfg).eval()
    _seed_and_randomise(model, seed)
    if out_dir is not None:
        model.save_pretrained(str(out_dir))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out_dir))
    return model


def make_hf_llava(
    out_dir: str | os.PathLike | None,
    tokenizer,
    seed: int = 0,
    projector: str = "mlp2x_gelu",
    vision_feature_layer: int | Sequence[int] = -2,
    vision_feature_select_strategy: str = "default",
    vision: dict[str, Any] | None = None,
    text: dict[str, Any] | None = None,
    projector_hidden_act: str = "gelu",
    multimodal_projector_bias: bool = True,
):
    """Builds a random `LlavaForConditionalGeneration` whose vocabulary is `tokenizer`'s (with `<image>`).

    `projector='linear'` is expressed the way transformers can load it: there is no single-linear LLaVA
    projector class in transformers, so only 'mlp2x_gelu' is exportable; 'linear' raises ValueError here.
    The saved directory also holds the tokenizer, an image processor and a processor config.
    """
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    if projector != "mlp2x_gelu":
        raise ValueError("transformers' LlavaForConditionalGeneration only has the 2-layer projector")
    torch.manual_seed(seed)
    vision_kw = tiny_clip_vision_kwargs(**(vision or {}))
    text_kw = tiny_llama_kwargs(len(tokenizer), **(text or {}))
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    n_patches = (vision_kw["image_size"] // vision_kw["patch_size"]) ** 2
    cfg = LlavaConfig(
        vision_config=vision_kw,
        text_config=text_kw,
        image_token_index=image_token_id,
        projector_hidden_act=projector_hidden_act,
        vision_feature_layer=list(vision_feature_layer)
        if isinstance(vision_feature_layer, (list, tuple))
        else vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        image_seq_length=n_patches + (1 if vision_feature_select_strategy == "full" else 0),
        multimodal_projector_bias=multimodal_projector_bias,
        tie_word_embeddings=text_kw.get("tie_word_embeddings", False),
    )
    cfg.pad_token_id = tokenizer.pad_token_id
    model = LlavaForConditionalGeneration(cfg).eval()
    _seed_and_randomise(model, seed)
    if out_dir is not None:
        model.save_pretrained(str(out_dir))
        make_hf_processor(
            tokenizer, vision_kw["image_size"], vision_kw["patch_size"], vision_feature_select_strategy
        ).save_pretrained(str(out_dir))
    return model


def make_hf_processor(tokenizer, image_size: int, patch_size: int, strategy: str = "default"):
    """A `LlavaProcessor` that expands `<image>` to the vision token count of the given geometry."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=clip_image_processor(image_size),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
    )
