"""Generate LLaVA visual instruction data with a text-only GPT model from COCO captions and boxes.

    OPENAI_API_KEY=... python -m data_gen.instruct --captions captions_train2017.json \
        --instances instances_train2017.json --out llava_instruct.json \
        [--types conversation,detail,complex] [--limit N] [--model NAME] [--base-url URL] [--max-rpm N]
        [--max-tpm N] [--concurrency N] [--journal FILE] [--seed S] [--batch] [--timeout-s S] [--max-retries N]
        [--config=configs/data_gen.py[:local]] [--config.client.KEY=VALUE ...]

Writes (atomically) --out: a JSON list of LLaVA records {"id": "<image stem>_<type>", "image": <file name>,
"conversations": [{"from": "human"|"gpt", "value"}, ...]} with "<image>" before or after the first question
(seeded), and <out stem>.summary.json (requested, succeeded, failed by reason, tokens, estimated cost). Every
reply is journaled in --journal (default <out stem>.journal.jsonl beside --out): rerunning the same command after
a crash sends only what is missing. Exit status: 0 done (see the summary for failures), 2 missing key, missing
input file or bad setting, 3 the server rejected the key (401) or reported no quota left.
"""

from __future__ import annotations

import importlib.util
import logging
import random
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from data_gen import prompts
from data_gen.client import ChatClient, ChatRequest, ChatResult, ClientConfig, MissingAPIKeyError, RunHalted
from data_gen.context import ContextError, ImageContext, format_context, load_contexts
from data_gen.replies import ReplyFormatError, parse_reply, validator
from llava_jax import cli
from llava_jax.io import atomic_write_json

log = logging.getLogger(__name__)

CONFIG_PATH = Path(__file__).resolve().parents[1] / "configs" / "data_gen.py"
IMAGE_TOKEN = "<image>"


def load_config(arg: str | None = None, path: str | Path = CONFIG_PATH) -> ml_collections.ConfigDict:
    """`get_config(arg)` of a config file (configs/data_gen.py by default), for use outside the CLI."""
    spec = importlib.util.spec_from_file_location("data_gen_config", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot load config file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def client_config(cfg: ml_collections.ConfigDict) -> ClientConfig:
    """The ClientConfig of a data_gen config, with its price override applied."""
    client = ClientConfig.from_mapping(cfg.client)
    if cfg.price.prompt_per_1m is not None and cfg.price.completion_per_1m is not None:
        client.prices = {**client.prices, client.model: {"prompt": float(cfg.price.prompt_per_1m),
                                                          "completion": float(cfg.price.completion_per_1m)}}
    return client


class InstructConfigError(ValueError):
    """A bad setting (e.g. an unknown instruction type)."""


def parse_types(types: str | Sequence[str]) -> list[str]:
    """["conversation", ...] from "conversation,detail"; raises InstructConfigError on an unknown type."""
    kinds = [t.strip() for t in (types.split(",") if isinstance(types, str) else types) if t.strip()]
    unknown = [k for k in kinds if k not in prompts.TYPES]
    if unknown or not kinds:
        raise InstructConfigError(f"--types: unknown or empty {unknown or types!r}; choose from {','.join(prompts.TYPES)}")
    return list(dict.fromkeys(kinds))


def request_key(context: ImageContext, kind: str) -> str:
    """The result key of one (image, type)."""
    return f"{context.file_name}::{kind}"


def build_requests(contexts: Sequence[ImageContext], kinds: Sequence[str], params: Any) -> list[ChatRequest]:
    """One ChatRequest per (image, type), image-major; `params[kind]` holds each type's sampling parameters."""
    requests = []
    for context in contexts:
        for kind in kinds:
            text = format_context(context, with_boxes=prompts.USES_BOXES[kind])
            kind_params = params[kind]
            kind_params = kind_params.to_dict() if hasattr(kind_params, "to_dict") else dict(kind_params)
            requests.append(ChatRequest(request_key(context, kind), prompts.build_messages(kind, text),
                                        kind_params, validator(kind)))
    return requests


def make_record(context: ImageContext, kind: str, reply: str, seed: int) -> dict[str, Any]:
    """A LLaVA record from an accepted reply. The detail question and the side of "<image>" are drawn from a
    generator seeded by (seed, image, type), so they do not depend on order. Raises ReplyFormatError."""
    turns = parse_reply(kind, reply)
    rng = random.Random(f"{seed}|{context.file_name}|{kind}")
    if kind == "detail":
        turns = [(rng.choice(prompts.detail_questions()), turns[0][1])]
    first_question = turns[0][0]
    assert first_question is not None
    if rng.random() < 0.5:
        first = f"{IMAGE_TOKEN}\n{first_question}"
    else:
        first = f"{first_question}\n{IMAGE_TOKEN}"
    conversations = []
    for i, (question, answer) in enumerate(turns):
        conversations.append({"from": "human", "value": first if i == 0 else question})
        conversations.append({"from": "gpt", "value": answer})
    return {"id": f"{Path(context.file_name).stem}_{kind}", "image": context.file_name,
            "conversations": conversations}


def assemble(
    contexts: Sequence[ImageContext], kinds: Sequence[str], results: dict[str, ChatResult], seed: int
) -> tuple[list[dict[str, Any]], dict[str, Counter], list[dict[str, str]]]:
    """Records of the successful (image, type) pairs in input order, counts per type ("requested", "succeeded",
    and failure reasons), and up to 20 failure examples."""
    records: list[dict[str, Any]] = []
    per_type: dict[str, Counter] = {kind: Counter() for kind in kinds}
    examples: list[dict[str, str]] = []
    for context in contexts:
        for kind in kinds:
            key = request_key(context, kind)
            per_type[kind]["requested"] += 1
            result = results.get(key)
            reason, detail = None, ""
            if result is None:
                reason = "no_result"
            elif not result.ok:
                reason, detail = result.error or "unknown", result.detail
            else:
                try:
                    records.append(make_record(context, kind, result.text or "", seed))
                    per_type[kind]["succeeded"] += 1
                except ReplyFormatError as e:
                    reason, detail = e.reason, str(e)
            if reason is not None:
                per_type[kind][f"failed:{reason}"] += 1
                if len(examples) < 20:
                    examples.append({"key": key, "reason": reason, "detail": detail[:300]})
    return records, per_type, examples


def default_journal(out: str | Path) -> Path:
    """<out dir>/<out stem>.journal.jsonl; for a gs:// --out, <out stem>.journal.jsonl in the current directory
    (the journal is appended to and fsynced line by line, which an object store cannot do)."""
    from llava_jax.io import as_path, is_remote

    if is_remote(out):
        return Path(as_path(out).stem + ".journal.jsonl").absolute()
    out = Path(out)
    return out.with_name(out.stem + ".journal.jsonl")


def summary_path(out: str | Path) -> Any:
    """<out dir>/<out stem>.summary.json (local or gs://, like --out)."""
    from llava_jax.io import as_path

    out = as_path(out)
    return out.with_name(out.stem + ".summary.json")


def generate(
    cfg: ml_collections.ConfigDict,
    captions: str | Path,
    instances: str | Path | None,
    out: str | Path,
    journal: str | Path | None = None,
    batch: bool = False,
) -> dict[str, Any]:
    """Runs the whole job (see the module docstring) and returns the summary it wrote."""
    kinds = parse_types(cfg.types)
    if instances is None and any(prompts.USES_BOXES[k] for k in kinds):
        log.warning("no --instances: detail and complex prompts will list no objects")
    contexts, skipped = load_contexts(captions, instances)
    if cfg.limit:
        contexts = contexts[: int(cfg.limit)]
    journal_path = Path(journal) if journal else default_journal(out)
    requests = build_requests(contexts, kinds, cfg.params)
    client_cfg = client_config(cfg)
    log.info("%d images x %d types = %d requests; journal %s", len(contexts), len(kinds), len(requests),
             journal_path)
    if batch:
        from data_gen.batch import BatchRunner

        runner = BatchRunner(client_cfg, journal_path, poll_s=cfg.batch.poll_s,
                             completion_window=cfg.batch.completion_window, discount=float(cfg.batch.discount))
        results = runner.run(requests)
        stats = runner.last_stats
    else:
        chat_client = ChatClient(client_cfg, journal_path)
        results = chat_client.run(requests, desc="instruct")
        stats = chat_client.last_stats
    records, per_type, examples = assemble(contexts, kinds, results, int(cfg.seed))
    atomic_write_json(out, records)

    failed: Counter = Counter()
    for counts in per_type.values():
        for name, count in counts.items():
            if name.startswith("failed:"):
                failed[name.removeprefix("failed:")] += count
    prompt_tokens = sum(r.prompt_tokens for r in results.values())
    completion_tokens = sum(r.completion_tokens for r in results.values())
    cost = client_cfg.cost_usd(prompt_tokens, completion_tokens)
    if cost is not None and batch:
        cost *= float(cfg.batch.discount)
    summary = {
        "out": str(out),
        "journal": str(journal_path),
        "model": client_cfg.model,
        "mode": "batch" if batch else "online",
        "images": len(contexts),
        "types": kinds,
        "requested": len(requests),
        "succeeded": len(records),
        "failed": dict(sorted(failed.items())),
        "by_type": {kind: dict(counts) for kind, counts in per_type.items()},
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "estimated_cost_usd": None if cost is None else round(cost, 6),
        "this_run": stats.to_dict(),
        "skipped_inputs": dict(skipped),
        "failure_examples": examples,
        "seed": int(cfg.seed),
    }
    atomic_write_json(summary_path(out), summary)
    log.info("wrote %d records to %s (%d failed: %s)", len(records), out, sum(failed.values()), dict(failed))
    return summary


# -- command line ----------------------------------------------------------------------------------------------

_CONFIG = config_flags.DEFINE_config_file("config", str(CONFIG_PATH), "data_gen config file (configs/data_gen.py).")
flags.DEFINE_string("captions", None, "COCO captions JSON.")
flags.DEFINE_string("instances", None, "COCO instances JSON (object boxes).")
flags.DEFINE_string("out", None, "Output LLaVA JSON file.")
flags.DEFINE_string("types", None, "Comma-separated instruction types (conversation,detail,complex).")
flags.DEFINE_integer("limit", None, "Use only the first N captioned images.")
flags.DEFINE_string("model", None, "Model name.")
flags.DEFINE_string("base-url", None, "OpenAI-compatible server URL (default api.openai.com).")
flags.DEFINE_float("max-rpm", None, "Requests-per-minute limit (0 = none).")
flags.DEFINE_float("max-tpm", None, "Tokens-per-minute limit (0 = none).")
flags.DEFINE_integer("concurrency", None, "Requests in flight at most.")
flags.DEFINE_float("timeout-s", None, "Seconds before a request counts as timed out (then retried).")
flags.DEFINE_integer("max-retries", None, "Retries per request on 429, 5xx, timeouts and dropped connections.")
flags.DEFINE_string("journal", None, "Journal JSONL (default: <out stem>.journal.jsonl beside --out).")
flags.DEFINE_integer("seed", None, "Seed for the detail question and <image> placement.")
flags.DEFINE_bool("batch", False, "Use the OpenAI Batch API instead of online requests.")
FLAGS = flags.FLAGS


def apply_flag_overrides(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Copies the command-line flags that were given into the config."""
    overrides = {
        ("types",): FLAGS.types, ("limit",): FLAGS.limit, ("seed",): FLAGS.seed,
        ("client", "model"): FLAGS.model, ("client", "base_url"): FLAGS["base-url"].value,
        ("client", "max_rpm"): FLAGS["max-rpm"].value, ("client", "max_tpm"): FLAGS["max-tpm"].value,
        ("client", "concurrency"): FLAGS.concurrency, ("client", "timeout_s"): FLAGS["timeout-s"].value,
        ("client", "max_retries"): FLAGS["max-retries"].value,
    }
    for path, value in overrides.items():
        if value is not None:
            target = cfg
            for name in path[:-1]:
                target = target[name]
            target[path[-1]] = value
    return cfg


def main(argv: Sequence[str]) -> None:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not FLAGS.captions or not FLAGS.out:
        raise app.UsageError("--captions and --out are required")
    cfg = apply_flag_overrides(_CONFIG.value)
    try:
        generate(cfg, FLAGS.captions, FLAGS.instances, FLAGS.out, FLAGS.journal, FLAGS.batch)
    except (MissingAPIKeyError, InstructConfigError, ContextError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunHalted as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    cli.absl_run(main)
