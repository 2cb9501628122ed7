"""Templates and label masks: expected tokens and masks written out by hand, per template."""

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AddedToken, PreTrainedTokenizerFast

from llava_jax.data import conversation as C
from llava_jax.tiny import build_tokenizer

IMG = "<image>"
N_IMG = 3
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", IMG, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
WORDS = (
    "Be brief. USER: ASSISTANT: Human: Assistant: ### what color is it? red. and the shape? circle. "
    "system user assistant caption here a b c d e f g h <|user|> <|assistant|> <|end|> <|system|>"
).split()


def word_tokenizer(chat_template=None):
    """One token per whitespace-separated word (BOS added by the tokenizer, as LLaMA's does), so expected ids and
    masks can be written by hand."""
    expected_words = [w for groups in EXPECTED.values() for text, _ in groups for w in text.split()]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(SPECIALS + WORDS + expected_words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True, normalized=False)
                                                           for t in SPECIALS[4:]]})
    if chat_template:
        fast.chat_template = chat_template
    return fast


TWO_TURNS = [
    {"from": "human", "value": "what color is it?\n<image>"},
    {"from": "gpt", "value": "red."},
    {"from": "human", "value": "and the shape?"},
    {"from": "gpt", "value": "circle."},
]
TEXT_ONLY = [
    {"from": "human", "value": "what color is it?"},
    {"from": "gpt", "value": "red."},
    {"from": "human", "value": "and the shape?"},
    {"from": "gpt", "value": "circle."},
]

# (token strings, supervised?) groups, written by hand. "I" marks an image position.
EXPECTED = {
    ("vicuna_v1", True): [
        ("<s> Be brief. USER: I I I what color is it? ASSISTANT:", False),
        ("red. </s>", True),
        ("USER: and the shape? ASSISTANT:", False),
        ("circle. </s>", True),
    ],
    ("vicuna_v1", False): [
        ("<s> Be brief. USER: what color is it? ASSISTANT:", False),
        ("red. </s>", True),
        ("USER: and the shape? ASSISTANT:", False),
        ("circle. </s>", True),
    ],
    ("vicuna_v0", True): [
        ("<s> Be brief.###Human: I I I what color is it?###Assistant:", False),
        ("red.###Human:", True),  # one word of the whole text: it overlaps the answer, so it is supervised
        ("and the shape?###Assistant:", False),
        ("circle.###", True),
    ],
    ("llama3", True): [
        ("<s> <|start_header_id|> system <|end_header_id|> Be brief. <|eot_id|> <|start_header_id|> user "
         "<|end_header_id|> I I I what color is it? <|eot_id|> <|start_header_id|> assistant <|end_header_id|>",
         False),
        ("red. <|eot_id|>", True),
        ("<|start_header_id|> user <|end_header_id|> and the shape? <|eot_id|> <|start_header_id|> assistant "
         "<|end_header_id|>", False),
        ("circle. <|eot_id|>", True),
    ],
    ("llama3", False): [
        ("<s> <|start_header_id|> system <|end_header_id|> Be brief. <|eot_id|> <|start_header_id|> user "
         "<|end_header_id|> what color is it? <|eot_id|> <|start_header_id|> assistant <|end_header_id|>", False),
        ("red. <|eot_id|>", True),
        ("<|start_header_id|> user <|end_header_id|> and the shape? <|eot_id|> <|start_header_id|> assistant "
         "<|end_header_id|>", False),
        ("circle. <|eot_id|>", True),
    ],
}


def _expected(groups):
    tokens, mask = [], []
    for text, supervised in groups:
        for t in text.split():
            tokens.append(IMG if t == "I" else t)
            mask.append(supervised)
    return tokens, mask


@pytest.mark.parametrize("name,with_image", sorted(EXPECTED))
def test_hand_written_masks(name, with_image):
    tok = word_tokenizer()
    img_id = tok.convert_tokens_to_ids(IMG)
    turns = TWO_TURNS if with_image else TEXT_ONLY
    template = C.get_template(name, system="Be brief.")
    enc = C.encode(turns, template, tok, N_IMG, img_id, 512, has_image=with_image)
    tokens, mask = _expected(EXPECTED[(name, with_image)])
    assert tok.convert_ids_to_tokens(enc.input_ids.tolist()) == tokens
    assert ((enc.labels != C.IGNORE_INDEX).tolist()) == mask
    sup = enc.labels != C.IGNORE_INDEX
    np.testing.assert_array_equal(enc.labels[sup], enc.input_ids[sup])
    assert enc.input_ids.dtype == np.int32 and enc.labels.dtype == np.int32


def test_plain_template_image_then_caption():
    tok = word_tokenizer()
    img_id = tok.convert_tokens_to_ids(IMG)
    rec = {"image": "x.jpg", "conversations": [{"from": "human", "value": "<image>\nwhat color is it?"},
                                               {"from": "gpt", "value": "caption here"}]}
    enc = C.encode(rec, "plain", tok, N_IMG, img_id, 64)
    assert tok.convert_ids_to_tokens(enc.input_ids.tolist()) == ["<s>", IMG, IMG, IMG, "caption", "here"]
    assert (enc.labels != C.IGNORE_INDEX).tolist() == [False] * 4 + [True] * 2
    with pytest.raises(C.TemplateMismatchError):
        C.encode({"image": "x.jpg", "conversations": TWO_TURNS}, "plain", tok, N_IMG, img_id)


CHAT = ("{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' <|end|> ' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}")


def test_tokenizer_chat_template_split_per_turn():
    tok = word_tokenizer(CHAT)
    img_id = tok.convert_tokens_to_ids(IMG)
    enc = C.encode(TWO_TURNS, "chat_template", tok, N_IMG, img_id, has_image=True)
    tokens, mask = _expected([
        ("<s> <|user|> I I I what color is it? <|end|> <|assistant|>", False),
        ("red. <|end|>", True),
        ("<|user|> and the shape? <|end|> <|assistant|>", False),
        ("circle. <|end|>", True),
    ])
    assert tok.convert_ids_to_tokens(enc.input_ids.tolist()) == tokens
    assert (enc.labels != C.IGNORE_INDEX).tolist() == mask
    prompt = C.encode_prompt(TWO_TURNS[:3], "chat_template", tok, N_IMG, img_id, has_image=True)
    assert prompt == enc.input_ids[: len(prompt)].tolist()
    assert tok.convert_ids_to_tokens(prompt[-1:]) == ["<|assistant|>"]


def test_chat_template_that_cannot_be_split_is_a_named_error():
    bad = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + ' ' }}{% endfor %}"
           "{% if add_generation_prompt %}{{ 'bot: ' }}{% endif %}")
    tok = word_tokenizer(bad)
    with pytest.raises(C.ChatTemplateSplitError):
        C.encode(TEXT_ONLY, "chat_template", tok, N_IMG, 4, has_image=False)
    with pytest.raises(C.ChatTemplateSplitError):
        C.encode(TEXT_ONLY, "chat_template", word_tokenizer(None), N_IMG, 4, has_image=False)


@pytest.fixture(scope="module")
def bpe():
    texts = [t["value"] for t in TWO_TURNS] + ["It is a large red circle on the left.", "There are two shapes."]
    return build_tokenizer(texts, vocab_size=300)


@pytest.mark.parametrize("name,sep", [("vicuna_v1", "</s>"), ("vicuna_v0", "###"), ("plain", "\n")])
def test_supervised_decode_is_answer_plus_separator_with_metaspace_bpe(bpe, name, sep):
    img_id = bpe.convert_tokens_to_ids(IMG)
    answers = ["It is a large red circle on the left.", "There are two shapes."]
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": answers[0]},
             {"from": "human", "value": "How many?"}, {"from": "gpt", "value": answers[1]}]
    if name == "plain":
        turns, answers = turns[:2], answers[:1]
    enc = C.encode(turns, name, bpe, 5, img_id, 1024, has_image=True)
    spans = C.supervised_spans(enc.labels)
    assert len(spans) == len(answers)
    for (s, e), answer in zip(spans, answers, strict=True):
        assert bpe.decode(enc.input_ids[s:e].tolist(), skip_special_tokens=False) == answer + sep
    assert (enc.input_ids == img_id).sum() == 5
    assert np.all(enc.labels[enc.input_ids == img_id] == C.IGNORE_INDEX)
    assert enc.input_ids[0] == bpe.bos_token_id and enc.labels[0] == C.IGNORE_INDEX
    prompt = C.encode_prompt(turns[:-1], name, bpe, 5, img_id, has_image=True)
    assert prompt == enc.input_ids[: len(prompt)].tolist()
    assert enc.labels[len(prompt)] != C.IGNORE_INDEX


def test_image_marker_normalised_before_or_after_text(bpe):
    img_id = bpe.convert_tokens_to_ids(IMG)
    after = [{"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "A circle."}]
    before = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A circle."}]
    a = C.encode(after, "v1", bpe, 4, img_id, has_image=True)
    b = C.encode(before, "v1", bpe, 4, img_id, has_image=True)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_truncation_keeps_image_whole_and_skips_cut_first_answer():
    tok = word_tokenizer()
    img_id = tok.convert_tokens_to_ids(IMG)
    template = C.get_template("vicuna_v1", system="Be brief.")
    full = C.encode(TWO_TURNS, template, tok, N_IMG, img_id, has_image=True)
    first_answer = C.supervised_spans(full.labels)[0][0]
    cut = C.encode(TWO_TURNS, template, tok, N_IMG, img_id, first_answer + 1, has_image=True)
    assert len(cut) == first_answer + 1 and cut.truncated
    assert (cut.input_ids == img_id).sum() == N_IMG
    for max_length in (first_answer, 5, 3):
        with pytest.raises(C.AnswerTruncatedError):
            C.encode(TWO_TURNS, template, tok, N_IMG, img_id, max_length, has_image=True)


@pytest.mark.parametrize(
    "conv,has_image,error",
    [
        ([], False, C.NoTurnsError),
        ([{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "a"}], False, C.UnknownRoleError),
        ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}], False, C.RoleOrderError),
        ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], False, C.RoleOrderError),
        ([{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "  "}], True, C.EmptyAnswerError),
        ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], True, C.MissingImageMarkError),
        ([{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "a"}], True,
         C.MultipleImageMarksError),
        ([{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}], False,
         C.ImageMarkWithoutImageError),
        ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}, {"from": "human", "value": "<image>"},
          {"from": "gpt", "value": "b"}], True, C.ImageMarkPlacementError),
        ([{"from": "human", "value": 5}, {"from": "gpt", "value": "a"}], False, C.BadTurnError),
        ([{"from": "human", "value": "q"}], False, C.NoTurnsError),
    ],
)
def test_bad_conversations_raise_named_errors(conv, has_image, error):
    tok = word_tokenizer()
    with pytest.raises(error) as info:
        C.encode(conv, "v1", tok, N_IMG, 4, has_image=has_image)
    assert info.value.reason and info.value.reason != "bad_conversation"


def test_unknown_template_name():
    with pytest.raises(KeyError, match="unknown conversation template"):
        C.get_template("vicuna_v9")
    assert C.get_template("llava_v1").name == "vicuna_v1"
