"""Conversation templates and label masking, tokenized turn by turn.

A record's turns are rendered into an alternating list of segments: a prompt segment (system text, the user's
message, the assistant's header; ignored in the loss) and an answer segment (the assistant's text plus the
template's end separator; supervised). Each text segment is tokenized on its own with
`add_special_tokens=False`, the image marker becomes exactly `num_image_tokens` copies of `image_token_id`, and
BOS is added explicitly. Labels are therefore built from the same pieces as the ids: they cannot drift, and
`encode_prompt` reproduces the training segmentation at inference, ending where the answer starts.

Templates: `plain` (stage 1: image then caption), `vicuna_v0` ('###' separators), `vicuna_v1` (aliases
`llava_v1`, `v1`: USER/ASSISTANT with `</s>` after answers), `llama3` (header tokens, `<|eot_id|>`), and
`chat_template` (the tokenizer's own Jinja template, split per turn with a prefix-consistency check).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

IGNORE_INDEX = -100
IMAGE_MARK = "<image>"

USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
SYSTEM_ROLES = ("system",)

# The system sentences of the Vicuna conventions. Released LLaVA checkpoints were trained with these exact
# strings, so they are protocol constants rather than prose of ours.
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
VICUNA_V0_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


# ------------------------------------------------------------------------------------------------ errors


class ConversationError(ValueError):
    """A record cannot be turned into a training sample; `reason` is a short machine-readable cause."""

    reason = "bad_conversation"


class NoTurnsError(ConversationError):
    reason = "no_turns"


class UnknownRoleError(ConversationError):
    reason = "unknown_role"


class RoleOrderError(ConversationError):
    reason = "roles_out_of_order"


class EmptyAnswerError(ConversationError):
    reason = "empty_answer"


class BadTurnError(ConversationError):
    reason = "bad_turn"


class MissingImageMarkError(ConversationError):
    reason = "image_mark_missing"


class MultipleImageMarksError(ConversationError):
    reason = "multiple_image_marks"


class ImageMarkWithoutImageError(ConversationError):
    reason = "image_mark_without_image"


class ImageMarkPlacementError(ConversationError):
    reason = "image_mark_not_in_first_turn"


class AnswerTruncatedError(ConversationError):
    reason = "first_answer_beyond_max_length"


class TemplateMismatchError(ConversationError):
    reason = "template_unsupported"


class ChatTemplateSplitError(ConversationError):
    """The tokenizer's chat template does not render each turn as a prefix of the next."""

    reason = "chat_template_unsplittable"


# ------------------------------------------------------------------------------------------------ templates


@dataclasses.dataclass(frozen=True)
class Template:
    """A conversation layout.

    system_format wraps `system` before the first user turn (skipped when `system` is empty); user_format wraps
    each user message and ends with the assistant's header (ignored in the loss); answer_format wraps each
    answer and holds the end separator (supervised). `{content}` is the message, `{system}` the system text.
    `image_only_prompt` (plain) replaces the user's text by the image alone. `stop_strings` end generation.
    `use_tokenizer_template` renders with the tokenizer's own chat template instead of the formats.
    """

    name: str
    system: str = ""
    system_format: str = "{system}"
    user_format: str = "{content}"
    answer_format: str = "{content}"
    stop_strings: tuple[str, ...] = ()
    add_bos: bool = True
    image_only_prompt: bool = False
    single_turn_only: bool = False
    use_tokenizer_template: bool = False


_TEMPLATES: dict[str, Template] = {
    "plain": Template(
        name="plain",
        user_format="{content}",
        answer_format="{content}\n",
        stop_strings=("\n",),
        image_only_prompt=True,
        single_turn_only=True,
    ),
    "vicuna_v0": Template(
        name="vicuna_v0",
        system=VICUNA_V0_SYSTEM,
        system_format="{system}###",
        user_format="Human: {content}###Assistant:",
        answer_format=" {content}###",
        stop_strings=("###",),
    ),
    "vicuna_v1": Template(
        name="vicuna_v1",
        system=VICUNA_V1_SYSTEM,
        system_format="{system} ",
        user_format="USER: {content} ASSISTANT:",
        answer_format=" {content}</s>",
        stop_strings=("</s>",),
    ),
    "llama3": Template(
        name="llama3",
        system="",
        system_format="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        user_format=(
            "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        answer_format="{content}<|eot_id|>",
        stop_strings=("<|eot_id|>",),
    ),
    "chat_template": Template(name="chat_template", use_tokenizer_template=True),
}
_ALIASES = {"llava_v1": "vicuna_v1", "v1": "vicuna_v1", "v0": "vicuna_v0", "tokenizer": "chat_template"}


def template_names() -> list[str]:
    """Every accepted template name (aliases included)."""
    return sorted(set(_TEMPLATES) | set(_ALIASES))


def get_template(name: str | Template, system: str | None = None) -> Template:
    """The template called `name` (see `template_names()`), optionally with its system text replaced."""
    if isinstance(name, Template):
        template = name
    else:
        key = _ALIASES.get(name, name)
        if key not in _TEMPLATES:
            raise KeyError(f"unknown conversation template {name!r}; known: {', '.join(template_names())}")
        template = _TEMPLATES[key]
    if system is not None:
        template = dataclasses.replace(template, system=system)
    return template


# ------------------------------------------------------------------------------------------------ turns


@dataclasses.dataclass(frozen=True)
class Turns:
    """A normalised conversation: user/assistant pairs (the last answer may be None at inference)."""

    system: str | None
    pairs: list[tuple[str, str | None]]
    has_image: bool


def _role(turn: Any, index: int) -> str:
    if not isinstance(turn, Mapping):
        raise BadTurnError(f"turn {index} is not an object")
    raw = turn.get("from", turn.get("role"))
    if not isinstance(raw, str):
        raise UnknownRoleError(f"turn {index} has no role ('from')")
    role = raw.strip().lower()
    if role in USER_ROLES:
        return "user"
    if role in ASSISTANT_ROLES:
        return "assistant"
    if role in SYSTEM_ROLES:
        return "system"
    raise UnknownRoleError(f"turn {index} has unknown role {raw!r}")


def _value(turn: Mapping, index: int) -> str:
    value = turn.get("value", turn.get("content"))
    if not isinstance(value, str):
        raise BadTurnError(f"turn {index} has no text value")
    return value


def normalize_turns(
    conversations: Any, has_image: bool, *, allow_open_end: bool = False, check_image_mark: bool = True
) -> Turns:
    """Checks a LLaVA `conversations` list and returns it as user/assistant pairs.

    The image marker must appear exactly once, in the first user turn, when `has_image`, and never otherwise;
    it is normalised to "<image>\\n" + text as LLaVA does. With `allow_open_end` the last user turn may be
    unanswered (inference); otherwise every user turn needs an answer.
    """
    if not isinstance(conversations, Sequence) or isinstance(conversations, (str, bytes)):
        raise NoTurnsError("'conversations' is not a list")
    if not conversations:
        raise NoTurnsError("conversation has no turns")
    turns = [(_role(t, i), _value(t, i)) for i, t in enumerate(conversations)]
    system = None
    if turns[0][0] == "system":
        system = turns[0][1]
        turns = turns[1:]
    if not turns:
        raise NoTurnsError("conversation has only a system turn")
    for i, (role, _) in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise RoleOrderError(f"turn {i} is from {role!r}, expected {expected!r} (human first, alternating)")
    pairs: list[tuple[str, str | None]] = []
    for i in range(0, len(turns), 2):
        answer = turns[i + 1][1] if i + 1 < len(turns) else None
        pairs.append((turns[i][1], answer))
    if pairs[-1][1] is None and not allow_open_end:
        if len(pairs) == 1:
            raise NoTurnsError("conversation has no answer (a single human turn)")
        raise RoleOrderError("conversation ends with an unanswered human turn")
    for i, (_, answer) in enumerate(pairs):
        if answer is not None and not answer.strip():
            raise EmptyAnswerError(f"answer {i} is empty")
    if check_image_mark:
        counts = [q.count(IMAGE_MARK) for q, _ in pairs] + [a.count(IMAGE_MARK) for _, a in pairs if a]
        total = sum(counts)
        if has_image:
            if total == 0:
                raise MissingImageMarkError("record has an image but no '<image>' marker")
            if total > 1:
                raise MultipleImageMarksError(f"record has {total} '<image>' markers; one is supported")
            if counts[0] != 1:
                raise ImageMarkPlacementError("'<image>' must be in the first human turn")
            first = IMAGE_MARK + "\n" + pairs[0][0].replace(IMAGE_MARK, "").strip()
            pairs[0] = (first, pairs[0][1])
        elif total:
            raise ImageMarkWithoutImageError("record has an '<image>' marker but no image")
    return Turns(system=system, pairs=pairs, has_image=has_image)


# ------------------------------------------------------------------------------------------------ tokenizing

_PREFIX_SPACE_CACHE: dict[int, tuple[Any, bool]] = {}


def _adds_prefix_space(tokenizer) -> bool:
    """True when the tokenizer prepends a word-boundary marker to every encode call (SentencePiece style)."""
    hit = _PREFIX_SPACE_CACHE.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    ids = tokenizer.encode("x", add_special_tokens=False)
    first = tokenizer.convert_ids_to_tokens(ids[:1])[0] if ids else ""
    result = first.startswith("▁") or first.startswith(" ")
    _PREFIX_SPACE_CACHE[id(tokenizer)] = (tokenizer, result)
    return result


def _strip_boundary_space(tokenizer, text: str) -> str:
    if text.startswith(" ") and _adds_prefix_space(tokenizer):
        return text[1:]  # the tokenizer's own word-boundary marker stands for this space
    return text


def _tokenize_many(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added (one call into the Rust tokenizer when available)."""
    texts = [_strip_boundary_space(tokenizer, t) for t in texts]
    out: list[list[int]] = [[] for _ in texts]
    todo = [i for i, t in enumerate(texts) if t]
    if not todo:
        return out
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        encodings = backend.encode_batch([texts[i] for i in todo], add_special_tokens=False)
        for i, enc in zip(todo, encodings, strict=True):
            out[i] = list(enc.ids)
    else:
        for i in todo:
            out[i] = list(tokenizer.encode(texts[i], add_special_tokens=False))
    return out


def _split_image(text: str) -> tuple[str, str | None]:
    """(text before the image marker, text after it) or (text, None) without a marker."""
    if IMAGE_MARK not in text:
        return text, None
    before, after = text.split(IMAGE_MARK, 1)
    if IMAGE_MARK in after:
        raise MultipleImageMarksError("more than one '<image>' in a prompt")
    return before, after


def _format_segments(turns: Turns, template: Template) -> list[tuple[str, bool]]:
    """(text, supervised) segments from the template's string formats; the last answer may be absent."""
    if template.single_turn_only and len(turns.pairs) > 1:
        raise TemplateMismatchError(f"template {template.name!r} takes single-turn records, got {len(turns.pairs)}")
    system = turns.system if turns.system is not None else template.system
    segments: list[tuple[str, bool]] = []
    for i, (question, answer) in enumerate(turns.pairs):
        if template.image_only_prompt:
            question = IMAGE_MARK if IMAGE_MARK in question else ""
        prompt = template.user_format.format(content=question)
        if i == 0 and system:
            prompt = template.system_format.format(system=system) + prompt
        segments.append((prompt, False))
        if answer is not None:
            segments.append((template.answer_format.format(content=answer), True))
    return segments


def _chat_template_segments(turns: Turns, tokenizer) -> list[tuple[str, bool]]:
    """(text, supervised) segments rendered by the tokenizer's chat template, checked for prefix consistency."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateSplitError("template 'chat_template' needs a tokenizer with a chat_template")
    messages: list[dict[str, str]] = []
    if turns.system is not None:
        messages.append({"role": "system", "content": turns.system})

    def render(msgs, gen):
        out = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        if not isinstance(out, str):
            raise ChatTemplateSplitError("apply_chat_template(tokenize=False) did not return text")
        return out

    segments: list[tuple[str, bool]] = []
    covered = ""
    for question, answer in turns.pairs:
        messages.append({"role": "user", "content": question})
        prompt_text = render(messages, True)
        if not prompt_text.startswith(covered):
            raise ChatTemplateSplitError("the chat template re-renders earlier turns differently; cannot split")
        segments.append((prompt_text[len(covered) :], False))
        covered = prompt_text
        if answer is None:
            break
        messages.append({"role": "assistant", "content": answer})
        full = render(messages, False)
        if not full.startswith(covered):
            raise ChatTemplateSplitError(
                "the chat template's generation prompt is not a prefix of the answered conversation; cannot split"
            )
        answer_text = full[len(covered) :]
        if answer.strip() and answer.strip() not in answer_text:
            raise ChatTemplateSplitError("the chat template's answer segment does not contain the answer")
        segments.append((answer_text, True))
        covered = full
    return segments


@dataclasses.dataclass(frozen=True)
class Encoded:
    """A tokenized sample: input_ids [T] int32, labels [T] int32 (IGNORE_INDEX where not supervised)."""

    input_ids: np.ndarray
    labels: np.ndarray
    truncated: bool = False

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def _as_turns(record_or_turns: Any, has_image: bool | None, allow_open_end: bool) -> Turns:
    if isinstance(record_or_turns, Turns):
        return record_or_turns
    if isinstance(record_or_turns, str):
        record_or_turns = [{"from": "human", "value": record_or_turns}]
    if isinstance(record_or_turns, Mapping):
        conversations = record_or_turns.get("conversations")
        if conversations is None:
            raise NoTurnsError("record has no 'conversations'")
        if has_image is None:
            has_image = record_or_turns.get("image") not in (None, "", [])
    else:
        conversations = record_or_turns
        if has_image is None:
            has_image = any(
                isinstance(t, Mapping) and IMAGE_MARK in str(t.get("value", t.get("content", "")))
                for t in conversations
            )
    return normalize_turns(conversations, bool(has_image), allow_open_end=allow_open_end)


def _segments_to_ids(
    segments: list[tuple[str, bool]], template: Template, tokenizer, image_ids: list[int]
) -> tuple[list[int], list[int], int | None]:
    """(input_ids, labels, index of the first supervised token or None)."""
    ids: list[int] = []
    labels: list[int] = []
    bos = tokenizer.bos_token_id
    starts_with_bos_text = bool(segments) and tokenizer.bos_token and segments[0][0].startswith(tokenizer.bos_token)
    if template.add_bos and bos is not None and not starts_with_bos_text:
        ids.append(bos)
        labels.append(IGNORE_INDEX)
    pieces: list[str] = []
    layout: list[tuple[int, int | None, bool]] = []  # (piece index before image, piece after or None, supervised)
    for text, supervised in segments:
        before, after = _split_image(text)
        pieces.append(before)
        if after is not None:
            pieces.append(after)
            layout.append((len(pieces) - 2, len(pieces) - 1, supervised))
        else:
            layout.append((len(pieces) - 1, None, supervised))
    tokens = _tokenize_many(tokenizer, pieces)
    first_answer = None
    for before, after, supervised in layout:
        piece = tokens[before] if after is None else tokens[before] + list(image_ids) + tokens[after]
        if supervised and piece and first_answer is None:
            first_answer = len(ids)
        ids.extend(piece)
        labels.extend(piece if supervised else [IGNORE_INDEX] * len(piece))
    return ids, labels, first_answer


def _render(turns: Turns, template: Template, tokenizer) -> list[tuple[str, bool]]:
    if template.use_tokenizer_template:
        return _chat_template_segments(turns, tokenizer)
    return _format_segments(turns, template)


def encode(
    record_or_turns: Any,
    template: Template | str,
    tokenizer,
    num_image_tokens: int,
    image_token_id: int,
    max_length: int | None = None,
    *,
    has_image: bool | None = None,
) -> Encoded:
    """Tokenizes a LLaVA record (or its `conversations` list) for training.

    Returns input_ids [T] and labels [T] (int32, T <= max_length): only answer tokens and their end separators
    are supervised; BOS, system text, user turns, assistant headers and image positions hold IGNORE_INDEX.
    The image marker becomes `num_image_tokens` copies of `image_token_id`. Longer samples are cut at
    `max_length`; the cut never lands inside the image tokens, and a sample whose first answer would be cut
    entirely raises AnswerTruncatedError. Other problems raise the ConversationError subclasses above.
    """
    template = get_template(template)
    turns = _as_turns(record_or_turns, has_image, allow_open_end=False)
    segments = _render(turns, template, tokenizer)
    image_ids = [int(image_token_id)] * int(num_image_tokens) if turns.has_image else []
    ids, labels, first_answer = _segments_to_ids(segments, template, tokenizer, image_ids)
    if first_answer is None:
        raise EmptyAnswerError("no supervised tokens after tokenization")
    truncated = False
    if max_length is not None and len(ids) > max_length:
        if first_answer >= max_length:
            raise AnswerTruncatedError(
                f"first answer starts at token {first_answer}, beyond max_length {max_length} "
                f"(prompt incl. {len(image_ids)} image tokens is too long)"
            )
        if image_ids:
            start = ids.index(int(image_token_id))
            if start < max_length < start + len(image_ids):
                raise AnswerTruncatedError("max_length would cut inside the image tokens")
        ids, labels, truncated = ids[:max_length], labels[:max_length], True
    return Encoded(np.asarray(ids, np.int32), np.asarray(labels, np.int32), truncated)


def encode_prompt(
    turns: Any,
    template: Template | str,
    tokenizer,
    num_image_tokens: int,
    image_token_id: int,
    *,
    has_image: bool | None = None,
) -> list[int]:
    """Token ids of a conversation whose last turn is the user's, ending where the assistant's answer starts.

    Uses exactly the segmentation of `encode`, so a model sees at inference what it saw in training. `turns`
    is a LLaVA `conversations` list, a record, or a single user message string.
    """
    template = get_template(template)
    norm = _as_turns(turns, has_image, allow_open_end=True)
    if norm.pairs[-1][1] is not None:
        raise RoleOrderError("encode_prompt needs a conversation that ends with a user turn")
    segments = _render(norm, template, tokenizer)
    image_ids = [int(image_token_id)] * int(num_image_tokens) if norm.has_image else []
    ids, _, _ = _segments_to_ids(segments, template, tokenizer, image_ids)
    return ids


def supervised_spans(labels: np.ndarray | Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) index ranges of consecutive supervised label positions."""
    spans, start = [], None
    for i, x in enumerate(list(labels) + [IGNORE_INDEX]):
        if x != IGNORE_INDEX and start is None:
            start = i
        elif x == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans
