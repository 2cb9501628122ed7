"""Settings of GPT instruction-data generation (data_gen.instruct) and its client.

    OPENAI_API_KEY=... python -m data_gen.instruct --config=configs/data_gen.py \
        --captions coco/annotations/captions_train2017.json --instances coco/annotations/instances_train2017.json \
        --out data/llava_instruct.json [--types conversation,detail,complex] [--limit N] [--max-rpm 500]

    # any OpenAI-compatible server (vLLM, ...): no key needed unless the server asks for one
    python -m data_gen.instruct --config=configs/data_gen.py:local --base-url http://127.0.0.1:8000/v1 \
        --model Qwen/Qwen2.5-7B-Instruct --captions ... --instances ... --out ...

Variants: default (OpenAI, gpt-4o-mini, tier-1-like limits), `local` (a self-hosted server: no rate limits,
more requests in flight). Command-line flags (--model, --base-url, --max-rpm, --max-tpm, --concurrency, --seed,
--types, --limit, --batch) override the matching values; any value can also be set with --config.key=value.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the data_gen config; `arg` picks the variant (None / "openai" or "local")."""
    c = ml_collections.ConfigDict()
    c.types = "conversation,detail,complex"
    c.seed = 0
    c.limit = 0  # 0 = every captioned image

    c.client = ml_collections.ConfigDict()
    c.client.model = "gpt-4o-mini"
    c.client.base_url = config_dict.placeholder(str)  # None = api.openai.com
    c.client.max_rpm = 500.0
    c.client.max_tpm = 200_000.0
    c.client.concurrency = 16
    c.client.timeout_s = 120.0
    c.client.max_retries = 6
    c.client.max_malformed_retries = 2
    c.client.backoff_base_s = 1.0
    c.client.backoff_max_s = 60.0
    c.client.rate_headroom = 0.02  # pace at 98% of max_rpm so server-side clocks never see the limit crossed
    c.client.expected_completion_tokens = 600  # reserved per request for TPM when max_tokens is unset
    c.client.api_key_env = "OPENAI_API_KEY"
    c.client.extra_headers = ml_collections.ConfigDict()  # literal headers (no secrets)
    c.client.header_envs = ml_collections.ConfigDict()  # header name -> env var holding its secret value
    c.client.progress = True

    # Price of the chosen model in USD per 1M tokens; unset = data_gen.client.DEFAULT_PRICES.
    c.price = ml_collections.ConfigDict()
    c.price.prompt_per_1m = config_dict.placeholder(float)
    c.price.completion_per_1m = config_dict.placeholder(float)

    # Sampling parameters sent with each type's requests (part of the journal key).
    c.params = ml_collections.ConfigDict()
    c.params.conversation = ml_collections.ConfigDict({"temperature": 0.7, "max_tokens": 1024})
    c.params.detail = ml_collections.ConfigDict({"temperature": 0.7, "max_tokens": 768})
    c.params.complex = ml_collections.ConfigDict({"temperature": 0.7, "max_tokens": 1024})

    # OpenAI Batch API (--batch): half price, results within the completion window.
    c.batch = ml_collections.ConfigDict()
    c.batch.poll_s = 30.0
    c.batch.completion_window = "24h"
    c.batch.discount = 0.5

    if arg in (None, "", "openai"):
        pass
    elif arg == "local":
        c.client.base_url = "http://127.0.0.1:8000/v1"
        c.client.max_rpm = 0.0
        c.client.max_tpm = 0.0
        c.client.concurrency = 64
    else:
        raise ValueError(f"unknown data_gen config variant {arg!r}; expected 'openai' or 'local'")
    return c
