"""Conversation templates, tokenization and label masking — the same ids as LLaVA, by construction.

Tokenization rule (what LLaVA's `preprocess` / `tokenizer_image_token` and its CLI do):

1. Render the whole conversation as one string with the template: system text, every user turn, every
   assistant header and answer (training), or everything up to and including the last assistant header
   (inference). The image marker `<image>` sits where the template puts it ("<image>\\n" + question).
2. Split the text at the image marker. Each piece is tokenized by ONE call of the tokenizer with its special
   tokens (`tokenizer(piece)`), so BOS comes only as the tokenizer adds it; the BOS of every piece after the
   first is dropped. Between two pieces go `num_image_tokens` copies of `image_token_id` (LLaVA inserts one
   image index and expands it in the model; here it is expanded before batching so shapes are static). Text
   after the marker therefore starts a fresh call, and everything else — later turns included — is tokenized
   as one string. This is what makes the ids right for both SentencePiece `legacy` modes: with
   `legacy: true` text after a special token gets the word-boundary marker (`</s>USER` -> `</s>`, `▁USER`),
   with `legacy: false` it does not (`</s>`, `USER`); tokenizing turn by turn gets the second case wrong.
   When the rendered text already starts with the BOS text (chat templates often write it), the pieces are
   tokenized without special tokens, as transformers' processors do. (transformers' LlavaProcessor tokenizes
   the text with the image tokens inside it instead: with `legacy: true` its ids are the same; with
   `legacy: false` the text right after its image tokens gets no word-boundary marker, so it lacks the one "▁"
   that LLaVA's fresh call after the marker gives, e.g. before the "\\n" of v1. LLaVA's training is followed.)
3. Labels come from character spans: the fast tokenizer's offset mapping places every token in the text; a
   token is supervised when its span overlaps an answer span (the answer plus its end separator, e.g.
   " {answer}</s>" for v1, "{caption}\\n" for plain; a token that straddles a boundary counts as answer).
   BOS, system text, user turns, assistant headers and image positions hold IGNORE_INDEX. Labels are read
   off the same ids, so a "tokenization mismatch" cannot happen, and no sample is dropped quietly: every
   problem is a named ConversationError subclass.
4. `encode_prompt` applies the same rule to the text that ends at the last assistant header, so for the same
   turns the inference prompt is a prefix of the training ids: the built-in templates end the header where a
   token must end (a space before the answer starts a new word, a special token or "\\n\\n" ends the header).
   A chat template whose header and answer merge into one token cannot have this property.

Templates (`get_template`): `plain` (stage 1, LLaVA's `preprocess_plain`: "<image>" + caption + "\\n", the
caption and its newline supervised), `vicuna_v0` ('###' separators), `vicuna_v1` (aliases `llava_v1`, `v1`:
"SYSTEM USER: <image>\\nQ ASSISTANT: A</s>USER: ..."), `llama3` (header tokens, `<|eot_id|>`) and
`chat_template` (the tokenizer's own Jinja template; each turn must render as a prefix of the next so the
answer spans can be found).
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


class TokenizerOffsetsError(ConversationError):
    """The tokenizer cannot report character offsets (a slow, Python-only tokenizer): labels need them."""

    reason = "tokenizer_without_offsets"


# ------------------------------------------------------------------------------------------------ templates


@dataclasses.dataclass(frozen=True)
class Template:
    """A conversation layout.

    system_format wraps `system` before the first user turn (skipped when `system` is empty); user_format wraps
    each user message and ends with the assistant's header (ignored in the loss); answer_format wraps each
    answer and holds the end separator (supervised). `{content}` is the message, `{system}` the system text.
    `image_only_prompt` (plain) replaces the user's text by the image alone. `stop_strings` end generation.
    `add_bos`: tokenize with the tokenizer's special tokens (its BOS), as LLaVA's `tokenizer(text)` calls do.
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


# ------------------------------------------------------------------------------------------------ rendering


@dataclasses.dataclass(frozen=True)
class Rendered:
    """A conversation rendered as one string; `answer_spans` are the [start, end) character ranges that are
    supervised (each answer with its end separator), in order."""

    text: str
    answer_spans: tuple[tuple[int, int], ...]


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
    """(text, supervised) segments rendered by the tokenizer's chat template, checked for prefix consistency.

    Joined, the segments are exactly `apply_chat_template(messages, tokenize=False)` of the whole conversation
    (with `add_generation_prompt=True` when it ends with a user turn); the splits only locate the answers.
    """
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


def render(turns: Turns, template: Template | str, tokenizer=None) -> Rendered:
    """The whole conversation as one string plus the character spans of its supervised answers.

    A conversation that ends with an unanswered user turn renders up to and including the assistant's header
    (the inference prompt). `tokenizer` is needed only by the `chat_template` template.
    """
    template = get_template(template)
    if template.use_tokenizer_template:
        segments = _chat_template_segments(turns, tokenizer)
    else:
        segments = _format_segments(turns, template)
    pieces: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for text, supervised in segments:
        if supervised and text:
            spans.append((pos, pos + len(text)))
        pieces.append(text)
        pos += len(text)
    return Rendered("".join(pieces), tuple(spans))


# ------------------------------------------------------------------------------------------------ tokenizing


@dataclasses.dataclass(frozen=True)
class Tokenized:
    """Token ids [T] of a text, each token's [start, end) character span in it [T, 2], which positions are
    image tokens [T] bool, and which are special tokens the tokenizer added itself (BOS) [T] bool."""

    ids: list[int]
    offsets: np.ndarray
    is_image: np.ndarray
    is_added: np.ndarray


def tokenize_with_image(
    text: str, tokenizer, num_image_tokens: int, image_token_id: int, *, add_special_tokens: bool = True
) -> Tokenized:
    """LLaVA's `tokenizer_image_token` with the image expanded, plus character offsets.

    The text is split at every `<image>`; each piece is tokenized in one call (`add_special_tokens` as given);
    when the first piece starts with BOS, the first token (the BOS) of every later piece is dropped; the
    pieces are joined by `num_image_tokens` copies of `image_token_id`. Returns ids [T], offsets [T, 2] into
    `text`, the image mask [T] and the added-special-token mask [T]. Raises TokenizerOffsetsError for
    tokenizers without offset mappings.
    """
    pieces = text.split(IMAGE_MARK)
    try:
        enc = tokenizer(pieces, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                        return_special_tokens_mask=True)
    except NotImplementedError as e:
        raise TokenizerOffsetsError(
            f"{type(tokenizer).__name__} gives no offset mapping; use a fast (tokenizers-backed) tokenizer"
        ) from e
    bos = tokenizer.bos_token_id
    first = enc["input_ids"][0]
    drop_bos = add_special_tokens and bos is not None and bool(first) and first[0] == bos
    n = int(num_image_tokens)
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    is_image: list[bool] = []
    is_added: list[int] = []
    pos = 0
    for k, piece in enumerate(pieces):
        p_ids, p_offsets, p_added = enc["input_ids"][k], enc["offset_mapping"][k], enc["special_tokens_mask"][k]
        if k > 0:
            ids.extend([int(image_token_id)] * n)
            offsets.extend([(pos - len(IMAGE_MARK), pos)] * n)
            is_image.extend([True] * n)
            is_added.extend([0] * n)
            if drop_bos:  # as tokenizer_image_token: x[offset:] for every piece after the first
                p_ids, p_offsets, p_added = p_ids[1:], p_offsets[1:], p_added[1:]
        ids.extend(int(t) for t in p_ids)
        offsets.extend((pos + int(a), pos + int(b)) for a, b in p_offsets)
        is_image.extend([False] * len(p_ids))
        is_added.extend(p_added)
        pos += len(piece) + len(IMAGE_MARK)
    return Tokenized(ids, np.asarray(offsets, np.int64).reshape(-1, 2), np.asarray(is_image, bool),
                     np.asarray(is_added, bool))


def _uses_special_tokens(text: str, template: Template, tokenizer) -> bool:
    """Whether the tokenizer adds its special tokens: as the template says, unless the text already opens
    with the BOS text (then adding BOS would double it; transformers' processors decide the same way)."""
    bos_text = getattr(tokenizer, "bos_token", None)
    return template.add_bos and not (bos_text and text.startswith(str(bos_text)))


def _check_image_marks(text: str, has_image: bool) -> None:
    count = text.count(IMAGE_MARK)
    if has_image and count == 0:
        raise MissingImageMarkError("the rendered conversation lost its '<image>' marker")
    if has_image and count > 1:
        raise MultipleImageMarksError(f"the rendered conversation has {count} '<image>' markers; one is supported")
    if not has_image and count:
        raise ImageMarkWithoutImageError("the rendered conversation has an '<image>' marker but no image")


def _tokenize_rendered(rendered: Rendered, template: Template, tokenizer, num_image_tokens: int,
                       image_token_id: int, has_image: bool) -> tuple[Tokenized, np.ndarray]:
    """Tokenized text and its supervised mask [T] bool: tokens whose character span overlaps an answer span
    (a token with an empty span counts as the character it stands at), never images or added BOS/EOS."""
    _check_image_marks(rendered.text, has_image)
    tokens = tokenize_with_image(
        rendered.text, tokenizer, num_image_tokens, image_token_id,
        add_special_tokens=_uses_special_tokens(rendered.text, template, tokenizer),
    )
    starts = tokens.offsets[:, 0]
    ends = np.maximum(tokens.offsets[:, 1], starts + 1)
    supervised = np.zeros(len(tokens.ids), bool)
    for a, b in rendered.answer_spans:
        supervised |= (starts < b) & (ends > a)
    supervised &= ~tokens.is_image & ~tokens.is_added
    return tokens, supervised


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
    """Tokenizes a LLaVA record (or its `conversations` list) for training, by the rule in the module docstring.

    Returns input_ids [T] and labels [T] (int32, T <= max_length): only answer tokens and their end separators
    are supervised; BOS, system text, user turns, assistant headers and image positions hold IGNORE_INDEX.
    The image marker becomes `num_image_tokens` copies of `image_token_id`. Longer samples are cut at
    `max_length`; the cut never lands inside the image tokens, and a sample whose first answer would be cut
    entirely raises AnswerTruncatedError. Other problems raise the ConversationError subclasses above.
    """
    template = get_template(template)
    turns = _as_turns(record_or_turns, has_image, allow_open_end=False)
    rendered = render(turns, template, tokenizer)
    tokens, supervised = _tokenize_rendered(rendered, template, tokenizer, num_image_tokens, image_token_id,
                                            turns.has_image)
    ids = np.asarray(tokens.ids, np.int32)
    labels = np.where(supervised, ids, IGNORE_INDEX).astype(np.int32)
    if not supervised.any():
        raise EmptyAnswerError("no supervised tokens after tokenization")
    first_answer = int(np.argmax(supervised))
    truncated = False
    if max_length is not None and len(ids) > max_length:
        if first_answer >= max_length:
            raise AnswerTruncatedError(
                f"first answer starts at token {first_answer}, beyond max_length {max_length} "
                f"(prompt incl. {int(tokens.is_image.sum())} image tokens is too long)"
            )
        image_at = np.flatnonzero(tokens.is_image)
        if image_at.size and image_at[0] < max_length <= image_at[-1]:
            raise AnswerTruncatedError("max_length would cut inside the image tokens")
        ids, labels, truncated = ids[:max_length], labels[:max_length], True
    return Encoded(ids, labels, truncated)


def encode_prompt(
    turns: Any,
    template: Template | str,
    tokenizer,
    num_image_tokens: int,
    image_token_id: int,
    *,
    has_image: bool | None = None,
) -> list[int]:
    """Token ids [T] of a conversation whose last turn is the user's, ending where the assistant's answer starts.

    The same rule as `encode` applied to the text that ends at the assistant's header, so for the same turns
    these ids are a prefix of the training ids. `turns` is a LLaVA `conversations` list, a record, or a single
    user message string.
    """
    template = get_template(template)
    norm = _as_turns(turns, has_image, allow_open_end=True)
    if norm.pairs[-1][1] is not None:
        raise RoleOrderError("encode_prompt needs a conversation that ends with a user turn")
    rendered = render(norm, template, tokenizer)
    tokens, _ = _tokenize_rendered(rendered, template, tokenizer, num_image_tokens, image_token_id, norm.has_image)
    return tokens.ids


def supervised_spans(labels: np.ndarray | Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) index ranges of consecutive supervised label positions in labels [T]."""
    spans, start = [], None
    for i, x in enumerate(list(labels) + [IGNORE_INDEX]):
        if x != IGNORE_INDEX and start is None:
            start = i
        elif x == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans
