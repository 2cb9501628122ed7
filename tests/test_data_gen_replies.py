"""data_gen.replies and data_gen.prompts: reply formats, rejections, and the prompt files themselves."""

from __future__ import annotations

import pytest

from data_gen import prompts
from data_gen.replies import ReplyFormatError, leak_reason, parse_detail, parse_qa, parse_reply, validator


def test_parse_qa_accepts_label_variants_and_multiline_answers():
    text = "**Q1:** What is it?\n**A1:** A dog.\nIt is brown.\n\n\n\nVery brown.\nQuestion: Where?\nAnswer: On a couch."
    assert parse_qa(text) == [("What is it?", "A dog.\nIt is brown.\n\nVery brown."), ("Where?", "On a couch.")]


@pytest.mark.parametrize("text, reason", [
    ("", "empty"),
    ("Sure! Here is the dialogue.\nQ: a\nA: b", "text_before_first_question"),
    ("Just some prose.", "text_before_first_question"),
    ("Q: a\nQ: b\nA: c", "turns_out_of_order"),
    ("Q: a\nA: b\nQ: c", "question_without_answer"),
    ("Q: a\nA:", "empty_turn"),
])
def test_parse_qa_rejections(text, reason):
    with pytest.raises(ReplyFormatError) as info:
        parse_qa(text)
    assert info.value.reason == reason


def test_detail_must_be_one_long_paragraph():
    paragraph = "A large dog lies on a green couch in a sunny living room while a child reads a book beside it."
    assert parse_detail("  " + paragraph.replace(" in a", "\nin a") + "\n") == paragraph
    for text, reason in [(paragraph + "\n\n" + paragraph, "not_one_paragraph"), ("A dog.", "too_short"),
                         ("Q: what?\nA: " + paragraph, "labelled_turns")]:
        with pytest.raises(ReplyFormatError) as info:
            parse_detail(text)
        assert info.value.reason == reason


@pytest.mark.parametrize("text, reason", [
    ("The dog is at [0.12, 0.40, 0.55, 0.90] in the frame.", "mentions_coordinates"),
    ("Its left edge is near 0.125 of the width.", "mentions_coordinates"),
    ("Judging by the bounding box, the dog is large.", "mentions_coordinates"),
    ("The coordinates show a person.", "mentions_coordinates"),
    ("According to the captions, there is a dog.", "mentions_source_text"),
    ("The provided descriptions mention a dog.", "mentions_source_text"),
    ("A brown dog sleeps on a couch next to 2 pillows.", None),
    ("The sign says the price is 3.50 dollars.", None),
])
def test_leak_detection(text, reason):
    assert leak_reason(text) == reason


def test_complex_needs_exactly_one_question_and_validator_reports_reasons():
    assert parse_reply("complex", "Q: Why?\nA: Because.\n\nAnd more.") == [("Why?", "Because.\n\nAnd more.")]
    check = validator("complex")
    assert check("Q: Why?\nA: Because.\nQ: And?\nA: So.") == "not_one_question"
    assert check("Q: Where is the cat?\nA: At [0.1, 0.2, 0.3, 0.4].") == "mentions_coordinates"
    assert validator("conversation")("Q: What?\nA: A dog.") is None
    with pytest.raises(ValueError, match="unknown instruction type"):
        parse_reply("poem", "x")


def test_prompt_files_meet_the_brief():
    assert len(set(prompts.detail_questions())) >= 12
    assert len(set(prompts.brief_questions())) >= 10
    for kind in prompts.TYPES:
        prompt = prompts.load_prompt(kind)
        assert len(prompt["examples"]) >= 2
        for example in prompt["examples"]:
            # Our own examples obey our own format rules and show the context layout of their type.
            assert validator(kind)(example["response"]) is None
            assert example["context"].startswith("Descriptions:\n")
            assert ("\nObjects:\n" in example["context"]) == prompts.USES_BOXES[kind]
        messages = prompts.build_messages(kind, "Descriptions:\nA cat.")
        roles = [m["role"] for m in messages]
        assert roles == ["system"] + ["user", "assistant"] * len(prompt["examples"]) + ["user"]
        assert messages[-1]["content"] == "Descriptions:\nA cat."
        assert "coordinates" in messages[0]["content"]
    with pytest.raises(prompts.PromptError):
        prompts.load_prompt("poem")
