"""ScienceQA with a text-only GPT: its own answers, and the LLaVA paper's two ensembles of them with ours.

Commands (subcommands of `python -m llava_jax.eval.scienceqa`):
  gpt-answer --data-dir SQA --split test --out gpt.jsonl [--limit N] [--judge-* flags] [--journal J]
  ensemble --data-dir SQA --answers ours.jsonl --judge-answers gpt.jsonl --mode complement|judge --out DIR
      [--rules official|lenient] [--judge-* flags] [--journal J]

gpt-answer: the GPT reads each problem's question, context (hint) and options, never the image (it is told when
  there is one it cannot see), reasons briefly and ends with "The answer is X."; it may decline when the text is
  not enough. Rows are LLaVA's answers layout (prompt = the text the GPT was shown), so `score`, `ensemble` and
  LLaVA's own scripts read them. A failed call leaves an empty reply and its error in metadata.
ensemble --mode complement: per problem, the GPT's option where it gave one (a letter within the choices), else
  ours (the paper's "GPT-4 complement").
ensemble --mode judge: where both gave the same option it stands (an agreement); everywhere else (different
  options, or either gave none) the GPT is asked again with the question, context, options and both replies in
  full (ours: a model that saw the image; its own: text only) and its final "The answer is X." is taken. A failed
  requery (the call failed, or no single in-range letter after one regeneration) keeps ours (the paper's "GPT-4
  as the judge").

Replies (ours, the GPT's and the requeries) are read with the score rules chosen by --rules (module
`llava_jax.eval.scienceqa`). Differences from LLaVA's eval_science_qa_gpt4*.py, on purpose: those read replies
with the "The answer is X." rule alone and pick a random option where a reply gives none; here a reply without an
option is wrong, deterministically. LLaVA's complement script skips problems missing either answer; here a
missing answer is a failed one. Every GPT call goes through the shared client (data_gen/client.py: rate limits,
retries, the journal that makes reruns free, the API key from the environment).

DIR receives ensemble.json (counts of agreements, requeries and failures, the ensemble's score tables with
LLaVA's result fields, our and the GPT's accuracy alone, the client's stats), answers.jsonl (the ensemble's
answers in LLaVA's layout: `score` on it gives the same accuracy) and, in judge mode, requery.jsonl (the
requeries in LLaVA's layout, readable as --requery-result by LLaVA's requery script).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from llava_jax.eval import scienceqa as sqa
from llava_jax.eval.answers import EvalDataError, answer_record, percent, read_answers
from llava_jax.io import atomic_write_json, atomic_write_jsonl

COMPLEMENT, JUDGE = "complement", "judge"
MODES = (COMPLEMENT, JUDGE)

SYSTEM = ("You are a careful science teacher. You answer multiple-choice questions from elementary and high "
          "school science, language and social studies, and you check other people's answers to them.")

_FINAL_LINE = ('finish with one line of the form "The answer is X." where X is the letter of the option you '
               "choose.")

_ANSWER_INSTRUCTIONS = (
    "Work from the question, the context and the options alone. If they do not tell you which option is right, "
    "say that you cannot tell instead of guessing. Otherwise explain your reasoning in a few sentences and "
    + _FINAL_LINE
)

_REQUERY_INSTRUCTIONS = (
    "Weigh both replies and decide which option is correct. You may side with either assistant or pick an option "
    "that neither chose; where the question depends on the picture, Assistant 1 was in a position to see it. "
    "Explain your decision in a few sentences, then " + _FINAL_LINE
)

NO_REPLY = "(no reply)"


def problem_text(problem: sqa.Problem) -> str:
    """The problem as a text-only reader gets it: question, context (when any) and lettered options."""
    lines = [f"Question: {problem.question.strip()}"]
    if problem.has_text_context:
        lines.append(f"Context: {problem.hint.strip()}")
    lines.append("Options:")
    lines.extend(f"({sqa.OPTION_LETTERS[i]}) {choice}" for i, choice in enumerate(problem.choices))
    return "\n".join(lines)


def answer_messages(problem: sqa.Problem) -> list[dict[str, str]]:
    """Chat messages asking the text-only GPT to answer one problem."""
    note = "This question comes with a picture that you cannot see.\n" if problem.has_image else ""
    user = f"{problem_text(problem)}\n\n{note}{_ANSWER_INSTRUCTIONS}"
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def requery_messages(problem: sqa.Problem, ours: str | None, theirs: str | None) -> list[dict[str, str]]:
    """Chat messages asking the GPT to decide between our reply and its own earlier reply."""
    user = (
        f"{problem_text(problem)}\n\n"
        "Two assistants answered this question. Assistant 1 was shown the picture that comes with the question "
        "(when there is one); Assistant 2 only read the text, as you do. Here are their replies with their "
        "reasoning.\n\n"
        f"[Assistant 1]\n{ours.strip() if ours and ours.strip() else NO_REPLY}\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\n{theirs.strip() if theirs and theirs.strip() else NO_REPLY}\n[End of Assistant 2]\n\n"
        f"{_REQUERY_INSTRUCTIONS}"
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def chosen_index(problem: sqa.Problem, reply: str | None, rules: str) -> int:
    """The option a reply chooses under `rules`: its 0-based index, or -1 for none (failed, out of range)."""
    if reply is None:
        return -1
    return sqa.option_index(sqa.extract_letter(reply, rules), len(problem.choices), rules)


def _final_answer_check(problem: sqa.Problem, rules: str):
    """The client's `validate` hook for a requery: None when the reply names one option of the problem."""

    def check(text: str) -> str | None:
        if chosen_index(problem, text, rules) < 0:
            return "no single 'The answer is X.' naming one of the options"
        return None

    return check


def _client(settings: Any, journal: str | os.PathLike):
    from llava_jax.eval import judge as judge_lib

    return judge_lib.make_client(settings, journal)


def _params(settings: Any) -> dict[str, Any]:
    return {"temperature": settings.temperature, "max_tokens": settings.max_tokens}


def gpt_answers(problems: Sequence[sqa.Problem], client: Any, settings: Any, rules: str = sqa.OFFICIAL
                ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Asks the text-only GPT every problem through `client` (data_gen.client.ChatClient).

    Returns:
      (answer rows in LLaVA's layout, in problem order; counts {n, answered, no_option, call_failures}).
    """
    from data_gen.client import ChatRequest

    messages = {p.pid: answer_messages(p) for p in problems}
    results = client.run([ChatRequest(p.pid, messages[p.pid], params=_params(settings)) for p in problems],
                         desc="scienceqa gpt-answer")
    rows, counts = [], {"n": len(problems), "answered": 0, "no_option": 0, "call_failures": 0}
    for p in problems:
        result = results.get(p.pid)
        metadata: dict[str, Any] = {"source": "text-only gpt"}
        if result is None or not result.ok:
            counts["call_failures"] += 1
            metadata["error"] = (result.error if result is not None else None) or "no result from the client"
            text = ""
        else:
            text = result.text or ""
            counts["answered" if chosen_index(p, text, rules) >= 0 else "no_option"] += 1
        rows.append(answer_record(p.pid, messages[p.pid][-1]["content"], text, settings.model, metadata))
    return rows, counts


@dataclasses.dataclass(frozen=True)
class Choice:
    """The ensemble's decision on one problem: the option index (-1: none) and where it came from."""

    pid: str
    index: int
    source: str  # agreement | judge | ours | requery | kept_ours
    ours: int
    theirs: int
    requery: int | None = None


def ensemble(problems: Sequence[sqa.Problem], ours: Mapping[str, Mapping[str, Any]],
             theirs: Mapping[str, Mapping[str, Any]], mode: str, rules: str = sqa.OFFICIAL,
             client: Any = None, settings: Any = None) -> tuple[dict[str, Choice], list[dict[str, Any]], dict]:
    """Combines our answers with the text-only GPT's (module docstring).

    Args:
      problems: the split's problems.
      ours, theirs: {pid: answer record} as read by `read_answers` and matched by `scienceqa.match_answers`.
      mode: "complement" or "judge".
      client, settings: the shared chat client and JudgeSettings; needed only in judge mode with requeries.
    Returns:
      ({pid: Choice}, requery rows in LLaVA's layout, counts {n, agreements, disagreements, requeries,
      failures: {ours, judge_answer, requery}, missing: {ours, judge}, used: {source: n}}).
    """
    from data_gen.client import ChatRequest

    if mode not in MODES:
        raise EvalDataError(f"unknown ensemble mode {mode!r} (choose from {', '.join(MODES)})")
    text = {}
    picks: dict[str, tuple[int, int]] = {}
    for p in problems:
        our_text = ours[p.pid].get("text") if p.pid in ours else None
        their_text = theirs[p.pid].get("text") if p.pid in theirs else None
        text[p.pid] = (our_text, their_text)
        picks[p.pid] = (chosen_index(p, our_text, rules), chosen_index(p, their_text, rules))

    counts: dict[str, Any] = {
        "n": len(problems),
        "agreements": sum(a >= 0 and a == b for a, b in picks.values()),
        "disagreements": sum(a >= 0 and b >= 0 and a != b for a, b in picks.values()),
        "requeries": 0,
        "failures": {"ours": sum(a < 0 for a, _ in picks.values()),
                     "judge_answer": sum(b < 0 for _, b in picks.values()), "requery": 0},
        "missing": {"ours": sum(p.pid not in ours for p in problems),
                    "judge": sum(p.pid not in theirs for p in problems)},
    }
    choices: dict[str, Choice] = {}
    to_ask: list[sqa.Problem] = []
    for p in problems:
        a, b = picks[p.pid]
        if mode == COMPLEMENT:
            choices[p.pid] = Choice(p.pid, b, "judge", a, b) if b >= 0 else Choice(p.pid, a, "ours", a, b)
        elif a >= 0 and a == b:
            choices[p.pid] = Choice(p.pid, a, "agreement", a, b)
        else:
            to_ask.append(p)

    requery_rows: list[dict[str, Any]] = []
    if to_ask:
        if client is None or settings is None:
            raise ValueError("judge mode needs a client and settings for its requeries")
        messages = {p.pid: requery_messages(p, *text[p.pid]) for p in to_ask}
        requests = [ChatRequest(p.pid, messages[p.pid], params=_params(settings),
                                validate=_final_answer_check(p, rules)) for p in to_ask]
        results = client.run(requests, desc="scienceqa requery")
        for p in to_ask:
            a, b = picks[p.pid]
            result = results.get(p.pid)
            reply = result.text if result is not None and result.ok else None
            picked = chosen_index(p, reply, rules)
            metadata: dict[str, Any] = {"source": "requery", "ours": a, "judge": b, "pick": picked}
            if picked < 0:
                counts["failures"]["requery"] += 1
                metadata["error"] = (result.error if result is not None else None) or "no option in the reply"
                choices[p.pid] = Choice(p.pid, a, "kept_ours", a, b, picked)
            else:
                choices[p.pid] = Choice(p.pid, picked, "requery", a, b, picked)
            requery_rows.append(answer_record(p.pid, messages[p.pid][-1]["content"], reply or "", settings.model,
                                              metadata))
        counts["requeries"] = len(to_ask)
    used: dict[str, int] = {}
    for c in choices.values():
        used[c.source] = used.get(c.source, 0) + 1
    counts["used"] = dict(sorted(used.items()))
    if mode == JUDGE:
        counts["requery_picked"] = {
            "ours": sum(c.source == "requery" and c.index == c.ours for c in choices.values()),
            "judge": sum(c.source == "requery" and c.index == c.theirs and c.index != c.ours
                         for c in choices.values()),
            "other": sum(c.source == "requery" and c.index not in (c.ours, c.theirs) for c in choices.values()),
        }
    return choices, requery_rows, counts


def _verdicts(problems: Sequence[sqa.Problem], choices: Mapping[str, Choice], ours: Mapping[str, Mapping[str, Any]],
              rules: str) -> dict[str, sqa.Verdict]:
    """The ensemble's choices as score verdicts; the image flag follows our answer, as `score` reads it."""
    letters = sqa.option_letters(rules)
    out = {}
    for p in problems:
        c = choices[p.pid]
        base = sqa.judge_reply(p, ours.get(p.pid), rules)
        parsed = letters[c.index] if c.index >= 0 else base.parsed
        out[p.pid] = dataclasses.replace(base, parsed=parsed, index=c.index, correct=c.index == p.answer,
                                         missing=base.missing and c.index < 0,
                                         reply=parsed if c.index >= 0 else base.reply)
    return out


def _final_rows(problems: Sequence[sqa.Problem], choices: Mapping[str, Choice], verdicts: Mapping[str, sqa.Verdict],
                ours: Mapping[str, Mapping[str, Any]], model_id: str) -> list[dict[str, Any]]:
    rows = []
    for p in problems:
        c, v = choices[p.pid], verdicts[p.pid]
        prompt = ours[p.pid].get("prompt") if p.pid in ours else "Unknown"
        rows.append(answer_record(p.pid, str(prompt if prompt is not None else ""), v.reply, model_id,
                                  {"source": c.source, "ours": c.ours, "judge": c.theirs, "requery": c.requery}))
    return rows


def _model_id(answers: Mapping[str, Mapping[str, Any]], default: str) -> str:
    ids = {str(a.get("model_id")) for a in answers.values() if a.get("model_id")}
    return ids.pop() if len(ids) == 1 else default


def ensemble_command(args: argparse.Namespace) -> int:
    """`scienceqa ensemble`: reads both answer files, combines them, writes DIR (module docstring)."""
    from llava_jax.eval import judge as judge_lib

    problems = sqa.load_problems(args.data_dir, args.split)
    ours_all, theirs_all = read_answers(args.answers), read_answers(args.judge_answers)
    ours, _ = sqa.match_answers(problems, ours_all, args.rules)
    theirs, _ = sqa.match_answers(problems, theirs_all, args.rules)
    settings = judge_lib.JudgeSettings.from_args(args)
    client = None
    if args.mode == JUDGE:
        client = _client(settings, args.journal or os.path.join(args.out, "journal.jsonl"))
    choices, requery_rows, counts = ensemble(problems, ours, theirs, args.mode, args.rules, client, settings)
    verdicts = _verdicts(problems, choices, ours, args.rules)
    result = sqa.score_verdicts(problems, verdicts, args.rules)
    ours_score = sqa.score(problems, ours, rules=args.rules)
    theirs_score = sqa.score(problems, theirs, rules=args.rules)
    summary = {
        "mode": args.mode,
        "rules": args.rules,
        "split": args.split,
        "judge_answers_model": _model_id(theirs, "unknown"),
        "requery_model": settings.model if args.mode == JUDGE else None,
        "counts": counts,
        "accuracy": result["accuracy"],
        "ours_accuracy": ours_score["accuracy"],
        "judge_accuracy": theirs_score["accuracy"],
        "upper_bound": percent(sum(choices[p.pid].ours == p.answer or choices[p.pid].theirs == p.answer
                                   for p in problems), len(problems)),
        "score": result,
        "client": client.last_stats.to_dict() if client is not None else None,
    }
    os.makedirs(args.out, exist_ok=True)
    model_id = f"{_model_id(ours, 'ours')}+{summary['judge_answers_model']}:{args.mode}"
    atomic_write_jsonl(os.path.join(args.out, "answers.jsonl"),
                       _final_rows(problems, choices, verdicts, ours, model_id))
    if args.mode == JUDGE:
        atomic_write_jsonl(os.path.join(args.out, "requery.jsonl"), requery_rows)
    atomic_write_json(os.path.join(args.out, "ensemble.json"), summary)
    print(f"ScienceQA {args.split} ensemble ({args.mode}, {args.rules} rules): accuracy {result['accuracy']}% "
          f"(ours {ours_score['accuracy']}%, {summary['judge_answers_model']} {theirs_score['accuracy']}%); "
          f"agreements {counts['agreements']}, requeries {counts['requeries']}, "
          f"failures {counts['failures']}")
    return 0


def gpt_answer_command(args: argparse.Namespace) -> int:
    """`scienceqa gpt-answer`: the text-only GPT's answers file for a split."""
    from llava_jax.eval import judge as judge_lib

    problems = sqa.load_problems(args.data_dir, args.split)
    if args.limit:
        problems = problems[: args.limit]
    settings = judge_lib.JudgeSettings.from_args(args)
    client = _client(settings, args.journal or f"{args.out}.journal.jsonl")
    rows, counts = gpt_answers(problems, client, settings)
    atomic_write_jsonl(args.out, rows)
    print(f"wrote {len(rows)} answers of {settings.model} to {args.out}: {counts['answered']} name an option, "
          f"{counts['no_option']} do not, {counts['call_failures']} calls failed")
    return 0


def add_gpt_answer_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of `gpt-answer` besides the data and --judge-* flags."""
    parser.add_argument("--out", required=True, help="answers JSONL (LLaVA's layout)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N problems (0: all)")


def add_ensemble_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of `ensemble` besides the data, --rules and --judge-* flags."""
    parser.add_argument("--answers", required=True, help="our answers (JSONL, LLaVA's layout)")
    parser.add_argument("--judge-answers", required=True,
                        help="the text-only GPT's answers (gpt-answer's JSONL, or LLaVA's result JSON)")
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--out", required=True, help="output directory")
