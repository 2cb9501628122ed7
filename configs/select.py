"""Settings of the InstructionGPT-4 data selector (selection.select).

    python -m selection.select --data cc_sbu_align/filter_cap.json --image-root cc_sbu_align/image --out runs/sel \
        --alpha 200 --config configs/select.py --config.clip.model_dir=CLIP_DIR \
        --config.reward.model_dir=REWARD_DIR [--config.mllm.model_dir=LLAVA] [--config.key=value ...]

Scores: clip, length, reward and gpt (InstructionGPT-4's four) and mllm (how much the image raises the answer's
likelihood under a LLaVA checkpoint: selection/mllm_score.py). A score that needs a model (clip, reward, mllm)
whose model_dir is not set is not computed: the selector uses weight 0 for it and says so in its output and in
report.json ("dropped_scores"). So mllm's default weight 1 applies exactly when mllm.model_dir is set.

Variants (`--config configs/select.py:VARIANT`), for ablations:
  default   every score, weight 1 each, min-max normalised, 10 spectral clusters
  random    a seeded uniform random subset (no scores, no clusters)
  clip | length | reward | gpt | mllm   that score alone (weight 1, the others 0), 10 clusters
  nocluster every score, K = 1 (no diversity step)
  offline   every score but gpt (no GPT requests)
"""

from __future__ import annotations

import ml_collections

SCORES = ("clip", "length", "reward", "gpt", "mllm")
VARIANTS = ("default", "random", *SCORES, "nocluster", "offline")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The selector config; `arg` names a variant (see the module docstring)."""
    variant = arg or "default"
    if variant not in VARIANTS:
        raise ValueError(f"unknown select variant {variant!r}; choose one of {VARIANTS}")
    c = ml_collections.ConfigDict()
    c.strategy = "score"  # 'score' (clusters + scores) or 'random'
    c.alpha = 200  # the budget; --alpha on the command line overrides it
    c.seed = 0
    c.instruction = "Describe this image in detail."  # paired with MiniGPT-4 captions, which store none
    c.normalization = "minmax"  # raw | minmax | zscore | rank
    c.weights = ml_collections.ConfigDict({name: 1.0 for name in SCORES})
    c.dedupe_answers = True  # of records with the same instruction and answer only the best-scoring one is eligible
    c.cache_dir = ""  # default: OUT/cache
    c.plots = True

    c.clip = ml_collections.ConfigDict()
    c.clip.model_dir = ""  # a Hugging Face CLIP directory (needed for the clip score and for clustering)
    c.clip.batch_size = 32
    c.clip.max_sentences = 10
    c.clip.scale = 100.0
    c.clip.aspect = "crop"  # CLIP's own preprocessing; 'pad' pastes onto a square first
    c.clip.workers = 4  # image decoding threads
    c.clip.dtype = "float32"  # compute dtype of the CLIP towers; bfloat16 on accelerators

    c.length = ml_collections.ConfigDict()
    c.length.unit = "chars"  # chars | words | tokens
    c.length.tokenizer_dir = ""  # for unit=tokens
    c.length.dedupe_sentences = True

    c.reward = ml_collections.ConfigDict()
    c.reward.model_dir = ""  # a transformers sequence-classification model directory
    c.reward.batch_size = 8
    c.reward.max_length = 512
    c.reward.device = "cpu"  # a torch device, e.g. "cuda"

    c.mllm = ml_collections.ConfigDict()
    c.mllm.model_dir = ""  # what `llava_jax.generate --model` takes: HF LLaVA dir, model dir or training workdir
    c.mllm.batch_size = 8  # examples per jitted call (fixed: the last batch is filled)
    c.mllm.max_length = 2048  # tokens per example, image tokens included
    c.mllm.template = ""  # empty = the model's own (a workdir's training template, e.g. plain after stage 1)
    c.mllm.dtype = "auto"  # auto (bfloat16 on accelerators, float32 on CPU) | float32 | bfloat16
    c.mllm.buckets = ()  # padded sequence lengths; empty = powers of two from 64, and max_length
    c.mllm.workers = 4  # image decoding threads

    c.gpt = ml_collections.ConfigDict()
    c.gpt.client = ml_collections.ConfigDict()
    c.gpt.client.model = "gpt-4o-mini"
    c.gpt.client.base_url = ""  # empty: the OpenAI API
    c.gpt.client.api_key_env = "OPENAI_API_KEY"
    c.gpt.client.max_rpm = 500.0
    c.gpt.client.max_tpm = 200_000.0
    c.gpt.client.concurrency = 16
    c.gpt.client.timeout_s = 120.0
    c.gpt.client.max_retries = 6
    c.gpt.client.progress = True
    c.gpt.temperature = 0.0
    c.gpt.max_tokens = 150

    c.cluster = ml_collections.ConfigDict()
    c.cluster.k = 10
    c.cluster.method = "auto"  # auto | spectral | spectral_sample | kmeans
    c.cluster.n_neighbors = 10
    c.cluster.spectral_max_n = 20000  # auto: spectral up to this many examples, kmeans above
    c.cluster.sample_size = 20000  # spectral_sample
    c.cluster.eigen_solver = "lobpcg"
    c.cluster.embeddings = ""  # optional .npy [N, D] aligned with the input records, instead of CLIP

    if variant == "random":
        c.strategy = "random"
        for name in SCORES:
            c.weights[name] = 0.0
    elif variant in SCORES:
        for name in SCORES:
            c.weights[name] = 1.0 if name == variant else 0.0
    elif variant == "nocluster":
        c.cluster.k = 1
    elif variant == "offline":
        c.weights.gpt = 0.0
    return c
