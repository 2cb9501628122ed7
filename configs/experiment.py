"""Settings of the InstructionGPT-4 experiment in miniature (selection.experiment).

    python -m selection.experiment --out runs/igpt4_mini [--noise 0.5] [--budgets 0.08,0.25] [--arms ...] \
        [--quick] [--config configs/experiment.py[:variant]] [--set KEY=VALUE ...]

Variants:
  default   4,000 synthetic images at 50% planted noise; stage 1 900 steps; CLIP 300 steps; stage 2 the same
            500 steps x 32 for every arm, 5 validation points; budgets 8% and 25%; 2 random seeds (14 stage-2
            runs, sized for ~60 min on 2 idle CPU cores)
  quick     1,000 images, stage 2 120 steps, one budget (10%), one random seed, arms full / clean / random /
            select only (the single-score and no-cluster ablations are the default's): a check of the whole
            pipeline in ~10 min, too short a training to rank the arms
  tiny      a few steps of a very small model on a few dozen records (the tests)
--noise, --budgets and --arms on the command line override `noise`, `budgets` and `arms`; --set KEY=VALUE any key.
"""

from __future__ import annotations

import ml_collections

from llava_jax.workflow import TEXT, VISION, VOCAB

ARM_KINDS = ("full", "clean", "oracle", "random", "select", "nocluster", "clip", "length", "mllm", "reward", "gpt")
VARIANTS = ("default", "quick", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The experiment config for variant `arg` (see the module docstring)."""
    variant = arg or "default"
    if variant not in VARIANTS:
        raise ValueError(f"unknown experiment variant {variant!r}; choose one of {VARIANTS}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.noise = "0.5"  # a share of bad records, or a list "0.5,0.3,0.7": every arm at the first, full/random/select at all
    c.budgets = "0.08,0.25"  # shares of the noisy set; the single-score and no-cluster arms run at the smallest
    c.arms = ""  # comma list of arm kinds (ARM_KINDS); empty = every kind that can run
    c.random_seeds = 2  # random subsets per budget (mean and spread reported)

    c.data = ml_collections.ConfigDict()
    c.data.num = 4000  # training images = stage-2 records
    c.data.num_eval = 200  # held-out questions (the reported accuracy)
    c.data.num_val = 200  # validation questions (pick the checkpoint), on images of their own
    c.data.image_size = VISION["image_size"]
    c.data.noise_kinds = ""  # llava_jax.data.noise mix, e.g. "contradiction=2,swap=1"; empty = its default

    c.model = ml_collections.ConfigDict()
    c.model.vision = ml_collections.ConfigDict(dict(VISION))
    c.model.text = ml_collections.ConfigDict(dict(TEXT))
    c.model.vocab = VOCAB

    c.stage1 = ml_collections.ConfigDict()
    c.stage1.steps = 900  # configs/pretrain.py:demo
    c.stage1.set = ()  # extra KEY=VALUE trainer settings

    c.stage2 = ml_collections.ConfigDict()
    c.stage2.steps = 500  # the same for every arm (small subsets: more epochs; hence the validation pick)
    c.stage2.batch_size = 32
    c.stage2.validations = 5  # checkpoints scored on the validation split (evenly spaced, the last included)
    # Noisy records carry descriptions: up to ~210 tokens with the demo tokenizer (the demo's 104 would cut them).
    c.stage2.max_length = 224
    c.stage2.bucket_lengths = (96, 160, 224)
    c.stage2.set = ()

    c.clip = ml_collections.ConfigDict()
    c.clip.model_dir = ""  # an HF CLIPModel dir to use as is; empty = train one (configs/clip.py:synthetic)
    c.clip.steps = 300  # 0 = the config's (500); 300 reaches ~0.9 held-out top-1 retrieval
    c.clip.set = ()

    c.mllm = ml_collections.ConfigDict()
    # LLaVA for the mllm score: 'full' (the full arm's stage-2 run: it has learned the answer format; run first),
    # 'stage1' (knows only captions: answers in the stage-2 format score as unlikely with any image), a path, or ''
    c.mllm.model = "full"

    c.reward = ml_collections.ConfigDict()
    c.reward.model_dir = ""  # a reward model dir: the reward score joins (weight 1) and gets its own arm

    c.judge = ml_collections.ConfigDict()
    c.judge.base_url = ""  # an OpenAI-compatible server: the gpt score joins, and select vs full is judged pairwise
    c.judge.model = "gpt-4o-mini"
    c.judge.api_key_env = "OPENAI_API_KEY"

    c.select = ml_collections.ConfigDict()
    c.select.set = ()  # extra KEY=VALUE selector settings (configs/select.py), for every selector arm

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 32
    c.eval.max_new_tokens = 12

    if variant == "quick":
        c.arms = "full,clean,random,select"
        c.budgets = "0.1"
        c.random_seeds = 1
        c.data.num = 1000
        c.data.num_eval = 100
        c.data.num_val = 100
        c.stage1.steps = 300
        c.stage2.steps = 120
        c.stage2.validations = 3
        c.clip.steps = 150
    elif variant == "tiny":
        c.budgets = "0.25"
        c.random_seeds = 1
        c.data.num = 40
        c.data.num_eval = 6
        c.data.num_val = 6
        c.data.image_size = 16
        c.model.vision = ml_collections.ConfigDict(dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
            patch_size=8, projection_dim=16, hidden_act="quick_gelu"))
        c.model.text = ml_collections.ConfigDict(dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, tie_word_embeddings=False))
        c.model.vocab = 200
        c.stage1.steps = 2
        c.stage1.set = ("batch_size=4", "checkpoint.use_async=False")
        c.stage2.steps = 4
        c.stage2.batch_size = 4
        c.stage2.validations = 2
        c.stage2.set = ("checkpoint.use_async=False",)
        c.clip.steps = 2
        c.clip.set = ("model.vision.image_size=16", "model.vision.hidden_size=16", "model.vision.intermediate_size=32",
                      "model.text.hidden_size=16", "model.text.intermediate_size=32", "model.projection_dim=16",
                      "batch_size=8", "data.num_holdout=8", "checkpoint.use_async=False")
        c.eval.max_new_tokens = 4
        c.eval.batch_size = 8
    return c
