"""OpenAI chat-completions requests -> engine inputs, and the OpenAI-style error body.

A request body is checked field by field; every problem is an `APIError` with a 4xx status and an OpenAI
error body {"error": {"message", "type", "param", "code"}}. Messages become the model's conversation turns
(the training encoding of llava_jax/data/conversation.py); the one image, if any, goes at the start of the
first user turn, where LLaVA was trained to see it. Images come as `data:image/...;base64,` URLs or as paths
under the server's image root; the server never fetches a remote URL.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from llava_jax.data import conversation, images
from llava_jax.serve.engine import SamplingParams

DEFAULT_MAX_TOKENS = 256
MAX_STOP_STRINGS = 4
_DATA_URL = re.compile(r"^data:(image/[A-Za-z0-9.+-]+)?(;[^,]*)?;base64,(.*)$", re.DOTALL)


class APIError(Exception):
    """A request the server refuses: HTTP `status` and an OpenAI error body."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.code, self.param = message, status, type, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class ChatRequest:
    """A checked request: model name, prompt token ids (image tokens expanded), pixels [H, W, 3] or None."""

    model: str
    prompt_ids: list[int]
    pixels: np.ndarray | None
    params: SamplingParams
    stream: bool
    include_usage: bool
    return_token_ids: bool


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(message, 400, param=param, code=code)


def _number(body: Mapping, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(f"'{name}' must be a number, got {type(v).__name__}", name)
    if not lo <= v <= hi:
        raise _bad(f"'{name}' must be between {lo} and {hi}, got {v}", name)
    return float(v)


def _integer(body: Mapping, name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"'{name}' must be an integer, got {type(v).__name__}", name)
    return v


class ImageSource:
    """Resolves an `image_url` to pixels: a base64 data URL, or a path inside `image_root` (None: refused)."""

    def __init__(self, image_config, image_root: str | os.PathLike | None, max_pixels: int):
        self.image_config = image_config
        self.root = Path(image_root).resolve() if image_root else None
        self.max_pixels = max_pixels

    def bytes_of(self, url: str) -> bytes | str:
        """The image bytes of a data URL, or the checked path of a file under the image root."""
        m = _DATA_URL.match(url)
        if m:
            if m.group(1) is None:
                raise _bad("the data URL is not an image (expected data:image/...;base64,...)", "messages")
            try:
                return base64.b64decode(re.sub(r"\s+", "", m.group(3)), validate=True)
            except (binascii.Error, ValueError) as e:
                raise _bad(f"the image's base64 payload is corrupt ({e})", "messages", "invalid_image") from e
        if url.startswith("data:"):
            raise _bad("only base64 data URLs are accepted (data:image/...;base64,...)", "messages")
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", url) and not url.startswith("file://"):
            raise _bad("remote image URLs are not fetched: send the image as a data URL, or a path under the "
                       "server's --image-root", "messages", "remote_url_refused")
        if self.root is None:
            raise _bad("this server has no --image-root: send the image as a base64 data URL", "messages")
        rel = url[len("file://"):] if url.startswith("file://") else url
        path = (self.root / rel).resolve()
        if path != self.root and self.root not in path.parents:
            raise APIError("the image path leaves the server's image root", 403, "permission_error",
                           "path_outside_root", "messages")
        if not path.is_file():
            raise _bad(f"image not found under the image root: {rel}", "messages", "image_not_found")
        return str(path)

    def load(self, url: str) -> np.ndarray:
        """Pixels [H, W, 3] of the image at `url` (CLIP preprocessing of the model)."""
        source = self.bytes_of(url)
        try:
            return images.preprocess(images.load_rgb(source, self.max_pixels), self.image_config)
        except images.DecompressionBombError as e:
            raise APIError(f"the image is too large: {e}", 400, code="image_too_large", param="messages") from e
        except (images.ImageError, OSError) as e:
            raise _bad(f"the image cannot be decoded: {e}", "messages", "invalid_image") from e


def _content(message: Mapping, i: int) -> tuple[str, list[str]]:
    """(text, image URLs) of one message's content."""
    content = message.get("content")
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise _bad(f"messages[{i}].content must be a string or a list of content parts", "messages")
    texts, urls = [], []
    for j, part in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
            raise _bad(f"{where} must be an object with a 'type'", "messages")
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise _bad(f"{where}.text must be a string", "messages")
            texts.append(part["text"])
        elif part["type"] == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, Mapping) else ref
            if not isinstance(url, str) or not url:
                raise _bad(f"{where}.image_url must hold a 'url' string", "messages")
            urls.append(url)
        else:
            raise _bad(f"{where} has unsupported type {part['type']!r} (text, image_url)", "messages")
    return "\n".join(texts), urls


def conversation_of(messages: Any) -> tuple[list[dict[str, str]], list[str]]:
    """OpenAI messages -> (conversation turns [{"from", "value"}], image URLs in order)."""
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages")
    turns, urls = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise _bad(f"messages[{i}] must be an object", "messages")
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise _bad(f"messages[{i}].role must be 'system', 'user' or 'assistant', got {role!r}", "messages")
        text, u = _content(m, i)
        if conversation.IMAGE_MARK in text:
            raise _bad(f"messages[{i}] contains the text {conversation.IMAGE_MARK!r}; send the image as an "
                       "image_url content part", "messages")
        if u and role != "user":
            raise _bad(f"messages[{i}]: only user messages may carry images", "messages")
        urls.extend(u)
        if role == "system" and turns:
            raise _bad("a system message may only come first", "messages")
        turns.append({"from": {"user": "human", "assistant": "gpt"}.get(role, role), "value": text})
    users = [t for t in turns if t["from"] == "human"]
    if not users:
        raise _bad("the request has no user message", "messages")
    if turns[-1]["from"] != "human":
        raise _bad("the last message must be the user's", "messages")
    return turns, urls


def prompt_ids_of(loaded, turns: list[dict[str, str]], with_image: bool) -> list[int]:
    """Token ids of the conversation in the model's template (the training encoding), the image at the start
    of the first user turn."""
    turns = [dict(t) for t in turns]
    if with_image:
        first = next(t for t in turns if t["from"] == "human")
        first["value"] = conversation.IMAGE_MARK + "\n" + first["value"]
    cfg = loaded.config
    system = turns[0]["value"] if turns[0]["from"] == "system" else None
    template = conversation.get_template(loaded.template, system=system)
    if system is not None:
        turns = turns[1:]
    try:
        return conversation.encode_prompt(turns, template, loaded.tokenizer, cfg.num_image_tokens,
                                          cfg.image_token_id, has_image=with_image)
    except conversation.ConversationError as e:
        raise _bad(f"the messages do not form a conversation: {e}", "messages") from e


def parse_chat_request(body: Any, loaded, model_name: str, images_from: ImageSource, max_len: int
                       ) -> ChatRequest:
    """Checks a chat-completions body and builds the engine's inputs (raises APIError)."""
    if not isinstance(body, Mapping):
        raise _bad("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise _bad("'model' must be a string", "model")
    if model != model_name:
        raise APIError(f"the model {model!r} does not exist; this server serves {model_name!r}", 404,
                       code="model_not_found", param="model")
    if body.get("n") not in (None, 1):
        raise _bad("only n=1 is supported", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping):
        raise _bad("'stream_options' must be an object", "stream_options")
    extra = body.get("return_token_ids", False)
    if not isinstance(extra, bool):
        raise _bad("'return_token_ids' must be a boolean", "return_token_ids")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad("'ignore_eos' must be a boolean", "ignore_eos")
    max_tokens = _integer(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens")
    if max_tokens is not None and max_tokens < 1:
        raise _bad(f"'max_tokens' must be at least 1, got {max_tokens}", "max_tokens")
    if max_tokens is not None and max_tokens >= max_len:
        raise _bad(f"'max_tokens' {max_tokens} is beyond this server's limit of {max_len - 1}", "max_tokens",
                   "max_tokens_too_large")
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p <= 0.0:
        raise _bad("'top_p' must be greater than 0", "top_p")
    seed = _integer(body, "seed")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP_STRINGS:
        raise _bad(f"'stop' must be a non-empty string or a list of up to {MAX_STOP_STRINGS} of them", "stop")

    turns, urls = conversation_of(body.get("messages"))
    if len(urls) > 1:
        raise _bad(f"the request has {len(urls)} images; this model takes one", "messages", "too_many_images")
    pixels = None
    if urls:
        if loaded.image_config is None:
            raise _bad("this model has no image preprocessing config and takes no images", "messages")
        pixels = images_from.load(urls[0])
    ids = prompt_ids_of(loaded, turns, pixels is not None)
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, max_len - len(ids))
    if len(ids) + max_tokens > max_len or max_tokens < 1:
        raise _bad(f"the prompt has {len(ids)} tokens; with max_tokens {max_tokens} that exceeds the context "
                   f"of {max_len} tokens", "messages", "context_length_exceeded")
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=tuple(stop),
                            seed=seed, ignore_eos=ignore_eos)
    return ChatRequest(model, ids, pixels, params, stream, bool(options.get("include_usage", False)), extra)
