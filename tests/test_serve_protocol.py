"""Request checking of the server (llava_jax/serve/protocol.py), without a model: messages -> the training
encoding, image sources (data URLs, the image root and its boundary), and the named 4xx errors."""

import base64
import io
import os
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from llava_jax import tiny
from llava_jax.data import conversation, images
from llava_jax.serve.protocol import APIError, ImageSource, conversation_of, parse_chat_request, prompt_ids_of

N_IMAGE = 4


@pytest.fixture(scope="module")
def loaded():
    tok = tiny.build_tokenizer(["a red circle", "two blue squares on the left"], vocab_size=200)
    config = SimpleNamespace(num_image_tokens=N_IMAGE, image_token_id=tok.convert_tokens_to_ids(tiny.IMAGE_TOKEN))
    return SimpleNamespace(config=config, tokenizer=tok, template="vicuna_v1",
                           image_config=images.ImageConfig(size=16, crop_size=16))


def _png(h=12, w=20) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_multi_turn_prompt_is_a_prefix_of_the_training_ids(loaded):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                             {"type": "image_url", "image_url": {"url": _url(_png())}}]},
                {"role": "assistant", "content": "A red circle."},
                {"role": "user", "content": "Where is it?"}]
    turns, urls = conversation_of(messages)
    assert len(urls) == 1 and [t["from"] for t in turns] == ["system", "human", "gpt", "human"]
    ids = prompt_ids_of(loaded, turns, with_image=True)
    record = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A red circle."},
              {"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": "On the left."}]
    template = conversation.get_template("vicuna_v1", system="Be brief.")
    train = conversation.encode(record, template, loaded.tokenizer, N_IMAGE, loaded.config.image_token_id)
    assert train.input_ids[: len(ids)].tolist() == ids
    assert ids.count(loaded.config.image_token_id) == N_IMAGE
    assert loaded.tokenizer.decode(ids).count("Be brief.") == 1


@pytest.mark.parametrize("messages, fragment", [
    ([], "non-empty list"),
    ([{"role": "system", "content": "x"}], "no user message"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}],
     "system message may only come first"),
    ([{"role": "robot", "content": "a"}], "role"),
    ([{"role": "user", "content": 5}], "string or a list"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "unsupported type"),
    ([{"role": "user", "content": "look: <image>"}], "image_url content part"),
    ([{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "a.png"}}]},
      {"role": "user", "content": "x"}], "only user messages"),
])
def test_bad_messages_are_400(messages, fragment):
    with pytest.raises(APIError, match=fragment) as e:
        conversation_of(messages)
    assert e.value.status == 400 and e.value.body()["error"]["type"] == "invalid_request_error"


def test_image_sources(tmp_path, loaded):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(_png())
    (tmp_path / "secret.png").write_bytes(_png())
    os.symlink(tmp_path / "secret.png", root / "link.png")
    src = ImageSource(loaded.image_config, root, max_pixels=500)
    assert src.load("a/x.png").shape == (16, 16, 3)
    assert src.load("file://a/x.png").shape == (16, 16, 3)
    np.testing.assert_array_equal(src.load(_url(_png())), src.load("a/x.png"))
    cases = [("../secret.png", 403, "path_outside_root"), (str(tmp_path / "secret.png"), 403, "path_outside_root"),
             ("link.png", 403, "path_outside_root"), ("a/none.png", 400, "image_not_found"),
             ("https://example.com/x.png", 400, "remote_url_refused"),
             ("data:image/png;base64,%%%", 400, "invalid_image"),
             (_url(b"GIF89a-but-not-really"), 400, "invalid_image"),
             (_url(_png(30, 30)), 400, "image_too_large")]
    for url, status, code in cases:
        with pytest.raises(APIError) as e:
            src.load(url)
        assert (e.value.status, e.value.code) == (status, code), url
    with pytest.raises(APIError, match="no --image-root"):
        ImageSource(loaded.image_config, None, 500).load("a/x.png")


def test_request_fields(loaded):
    src = ImageSource(loaded.image_config, None, 10_000)
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    req = parse_chat_request(dict(base, max_tokens=5, temperature=0.5, top_p=0.9, stop="###", seed=3), loaded,
                             "m", src, max_len=512)
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.stop, p.seed) == (5, 0.5, 0.9, ("###",), 3)
    assert req.pixels is None and not req.stream
    default = parse_chat_request(base, loaded, "m", src, max_len=512).params.max_tokens
    assert default == 256  # min(256, room left in the context)
    bad = [({"model": "other"}, 404), ({"max_tokens": 0}, 400), ({"max_tokens": 512}, 400),
           ({"max_tokens": True}, 400), ({"temperature": 3}, 400), ({"top_p": 0}, 400), ({"stream": "yes"}, 400),
           ({"stop": ["a"] * 5}, 400), ({"n": 3}, 400), ({"seed": 1.5}, 400)]
    for extra, status in bad:
        with pytest.raises(APIError) as e:
            parse_chat_request(dict(base, **extra), loaded, "m", src, max_len=512)
        assert e.value.status == status, extra
    n = len(req.prompt_ids)
    assert parse_chat_request(dict(base, max_tokens=512 - n), loaded, "m", src, max_len=512).params.max_tokens \
        == 512 - n
    with pytest.raises(APIError, match="exceeds the context") as e:
        parse_chat_request(dict(base, max_tokens=512 - n + 1), loaded, "m", src, max_len=512)
    assert e.value.code == "context_length_exceeded"
