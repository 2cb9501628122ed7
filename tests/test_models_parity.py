"""Golden checks: our Flax CLIP, LLaMA and LLaVA against transformers' PyTorch classes on tiny random configs."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from llava_jax import tiny  # noqa: E402
from llava_jax.convert import hf_keys  # noqa: E402
from llava_jax.convert.model_dir import llava_params_from_hf  # noqa: E402
from llava_jax.convert.params import build_with_params, param_shapes  # noqa: E402
from llava_jax.models.clip import CLIPModel, CLIPTextConfig, CLIPVisionConfig  # noqa: E402
from llava_jax.models.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402
from llava_jax.models.llava import Llava, LlavaConfig  # noqa: E402

TOL = 1e-4


def _np(t):
    return t.detach().float().numpy()


def _state(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _nhwc(pixels):
    return jnp.asarray(np.transpose(pixels, (0, 2, 3, 1)))


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer(["a red circle", "two blue squares on the left"], vocab_size=200)


def test_clip_vision_hidden_states_and_text_logits():
    hf = tiny.make_hf_clip(None, seed=1)
    cfg = hf.config
    vision = CLIPVisionConfig.from_hf(cfg.vision_config.to_dict())
    text = CLIPTextConfig.from_hf(cfg.text_config.to_dict())

    def build():
        return CLIPModel(vision, text, cfg.projection_dim, rngs=nnx.Rngs(0))

    arrays = hf_keys.hf_to_ours(_state(hf), hf_keys.clip_model_rules(), param_shapes(build), np.float32)
    ours = build_with_params(build, arrays)
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
    ids = np.array([[0, 5, 9, 33, 2, 1, 1], [0, 7, 8, 9, 10, 11, 2]])
    mask = np.array([[1, 1, 1, 1, 1, 0, 0], [1] * 7])
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels), attention_mask=torch.tensor(mask),
                 output_hidden_states=True)
        vis = hf.vision_model(pixel_values=torch.tensor(pixels), output_hidden_states=True)
    hidden, pooled = ours.vision_model(_nhwc(pixels))
    assert hidden.shape[0] == len(vis.hidden_states)
    for i, h in enumerate(vis.hidden_states):
        np.testing.assert_allclose(np.asarray(hidden[i]), _np(h), atol=TOL, err_msg=f"vision layer {i}")
    np.testing.assert_allclose(np.asarray(pooled), _np(vis.pooler_output), atol=TOL)
    img = np.asarray(ours.image_embeds(_nhwc(pixels)))
    txt = np.asarray(ours.text_embeds(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(img / np.linalg.norm(img, axis=-1, keepdims=True), _np(out.image_embeds), atol=TOL)
    np.testing.assert_allclose(txt / np.linalg.norm(txt, axis=-1, keepdims=True), _np(out.text_embeds), atol=TOL)
    per_image, per_text = ours(jnp.asarray(ids), _nhwc(pixels), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(per_image), _np(out.logits_per_image), atol=TOL)
    np.testing.assert_allclose(np.asarray(per_text), _np(out.logits_per_text), atol=TOL)


@pytest.mark.parametrize("variant", ["gqa_untied", "tied_bias_llama3"])
def test_llama_logits(variant):
    if variant == "gqa_untied":
        kw = {}
    else:
        kw = dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True, num_key_value_heads=4,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                  rope_theta=500000.0)
    hf = tiny.make_hf_llama(None, vocab_size=120, seed=3, **kw)
    cfg = LlamaConfig.from_hf(hf.config.to_dict())
    assert cfg.tie_word_embeddings == kw.get("tie_word_embeddings", False)

    def build():
        return LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))

    state = _state(hf)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    arrays = hf_keys.hf_to_ours(state, hf_keys.llama_causal_lm_rules(""), param_shapes(build), np.float32)
    ours = build_with_params(build, arrays)
    ids = np.random.default_rng(1).integers(3, 120, size=(2, 40))
    mask = np.ones_like(ids)
    mask[1, 30:] = 0  # right padding
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    logits, _ = ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(logits)[0], _np(ref)[0], atol=TOL)
    np.testing.assert_allclose(np.asarray(logits)[1, :30], _np(ref)[1, :30], atol=TOL)


def _hf_llava(tokenizer, **kw):
    return tiny.make_hf_llava(None, tokenizer, seed=5, **kw)


def _ours_from_hf(hf):
    cfg = LlavaConfig.from_hf(hf.config.to_dict())
    arrays = llava_params_from_hf(_state(hf), cfg)
    return build_with_params(lambda: Llava(cfg, rngs=nnx.Rngs(0)), arrays), cfg


def _prompts(tokenizer, cfg, with_image):
    n = cfg.num_image_tokens
    image = "<image>" * n
    texts = [("USER: " + image + "\nWhat colour is the circle? ASSISTANT:") if w else "USER: hi there ASSISTANT: ok"
             for w in with_image]
    return [tokenizer(t).input_ids for t in texts]


@pytest.mark.parametrize("variant", [
    dict(vision_feature_layer=-2, vision_feature_select_strategy="default"),
    dict(vision_feature_layer=-1, vision_feature_select_strategy="full"),
    dict(vision_feature_layer=[-3, -1], vision_feature_select_strategy="default", projector_hidden_act="gelu_pytorch_tanh"),
    dict(vision_feature_layer=-2, text=dict(tie_word_embeddings=True)),
])
def test_llava_logits(tokenizer, variant):
    hf = _hf_llava(tokenizer, **variant)
    ours, cfg = _ours_from_hf(hf)
    seqs = _prompts(tokenizer, cfg, [True, False, True])
    t = max(len(s) for s in seqs)
    ids = np.full((3, t), tokenizer.pad_token_id)
    mask = np.zeros((3, t), np.int64)
    for i, s in enumerate(seqs):  # right padding, mixed batch
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    pixels = np.random.default_rng(2).normal(size=(3, 3, 32, 32)).astype(np.float32)
    has_image = np.array([True, False, True])
    with torch.no_grad():
        ref_img = hf(input_ids=torch.tensor(ids[[0, 2]]), attention_mask=torch.tensor(mask[[0, 2]]),
                     pixel_values=torch.tensor(pixels[[0, 2]])).logits
        ref_txt = hf(input_ids=torch.tensor(ids[[1]]), attention_mask=torch.tensor(mask[[1]])).logits
    logits, _ = ours(jnp.asarray(ids), _nhwc(pixels), jnp.asarray(has_image), jnp.asarray(mask))
    logits = np.asarray(logits)
    for row, ref in [(0, ref_img[0]), (2, ref_img[1]), (1, ref_txt[0])]:
        n = len(seqs[row])
        np.testing.assert_allclose(logits[row, :n], _np(ref)[:n], atol=TOL, err_msg=f"row {row}")
    # text-only batch without pixels at all
    logits_txt, _ = ours(jnp.asarray(ids[[1]]), attention_mask=jnp.asarray(mask[[1]]))
    n = len(seqs[1])
    np.testing.assert_allclose(np.asarray(logits_txt)[0, :n], _np(ref_txt)[0, :n], atol=TOL)


def test_linear_projector_matches_a_torch_linear(tokenizer):
    hf = _hf_llava(tokenizer)
    ours, cfg = _ours_from_hf(hf)
    lin_cfg = cfg.replace(projector="linear")
    lin = Llava(lin_cfg, rngs=nnx.Rngs(3))
    feats = np.random.default_rng(0).normal(size=(2, 16, cfg.vision.hidden_size)).astype(np.float32)
    torch_lin = torch.nn.Linear(cfg.vision.hidden_size, cfg.text.hidden_size)
    with torch.no_grad():
        torch_lin.weight.copy_(torch.tensor(np.asarray(lin.projector.linear_1_kernel[...]).T))
        torch_lin.bias.copy_(torch.tensor(np.asarray(lin.projector.linear_1_bias[...])))
        ref = torch_lin(torch.tensor(feats)).numpy()
    np.testing.assert_allclose(np.asarray(lin.projector(jnp.asarray(feats))), ref, atol=TOL)


def test_bf16_forward_close_to_fp32(tokenizer):
    hf = _hf_llava(tokenizer)
    cfg = LlavaConfig.from_hf(hf.config.to_dict())
    arrays = llava_params_from_hf(_state(hf), cfg)
    f32 = build_with_params(lambda: Llava(cfg, rngs=nnx.Rngs(0)), arrays)
    bf16 = build_with_params(lambda: Llava(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), arrays)
    seq = _prompts(tokenizer, cfg, [True])
    ids = jnp.asarray(seq)
    pixels = _nhwc(np.random.default_rng(2).normal(size=(1, 3, 32, 32)).astype(np.float32))
    a, _ = f32(ids, pixels)
    b, _ = bf16(ids, pixels)
    a, b = np.asarray(a), np.asarray(b.astype(jnp.float32))
    # bf16 keeps 8 bits of mantissa: logits of order 1 agree to a few 1e-2, and rankings mostly agree.
    assert np.max(np.abs(a - b)) < 0.15 * max(1.0, np.max(np.abs(a)))
    assert np.mean(a.argmax(-1) == b.argmax(-1)) > 0.9
