"""The serving engine (llava_jax/serve/engine.py): continuous batching over slot KV caches gives the same
greedy tokens as `llava_jax.generate.generate`, alone and with requests admitted while others decode."""

import threading

import numpy as np
import pytest

pytest.importorskip("torch")

from llava_jax import tiny  # noqa: E402
from llava_jax.convert.model_dir import load_model  # noqa: E402
from llava_jax.data import images  # noqa: E402
from llava_jax.generate import build_prompt_ids, eos_ids_of, generate  # noqa: E402
from llava_jax.serve.engine import (  # noqa: E402
    ContextLengthError,
    Engine,
    EngineError,
    FinishEvent,
    SamplingParams,
    ShuttingDownError,
    TextTracker,
    TokenEvent,
)

QUESTIONS = ["What is it?", "Describe the picture in detail please", "hi", "Is there a red circle on the left?",
             "two blue squares"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_engine") / "hf"
    tok = tiny.build_tokenizer(["a red circle", "two blue squares on the left"], vocab_size=200)
    tiny.make_hf_llava(d, tok, seed=11)
    loaded = load_model(d)
    rng = np.random.default_rng(0)
    pix = [images.preprocess(images.load_rgb(_png(rng)), loaded.image_config) for _ in range(3)]
    engine = Engine(loaded, max_batch=3, max_len=256).start()
    yield loaded, engine, pix
    engine.stop(30)


def _png(rng) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20 + int(rng.integers(30)), 40, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _reference(loaded, ids, pixels, n, longest=32):
    """generate's greedy answer cut to n tokens (one compilation for every n: greedy answers are prefixes)."""
    out = generate(loaded.model, [ids], None if pixels is None else pixels[None], None, max_new_tokens=longest,
                   eos_ids=eos_ids_of(loaded.tokenizer, loaded.config), stop_strings=("</s>",),
                   tokenizer=loaded.tokenizer, pad_id=loaded.tokenizer.pad_token_id or 0)[0]
    return out[:n]


def test_greedy_equals_generate_under_continuous_batching(setup):
    loaded, engine, pix = setup
    jobs = []
    for j, q in enumerate(QUESTIONS):
        p = pix[j % 3] if j % 4 != 2 else None
        ids = build_prompt_ids(loaded, q, with_image=p is not None)
        jobs.append((ids, p, 6 + 5 * j))  # 6..26 new tokens
    # more requests than slots, submitted from several threads at staggered times: later ones join while
    # earlier ones decode, and finished slots are reused
    results = [None] * len(jobs)

    def run(j):
        ids, p, n = jobs[j]
        results[j] = engine.submit(ids, p, SamplingParams(max_tokens=n)).result(120)

    threads = [threading.Thread(target=run, args=(j,)) for j in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    for j, (ids, p, n) in enumerate(jobs):
        ref = _reference(loaded, ids, p, n)
        assert results[j].token_ids == ref, f"request {j}"
        assert results[j].reason == ("length" if len(ref) == n and ref[-1] not in engine.eos_ids else "stop")
        assert results[j].prompt_tokens == len(ids)
    assert engine.active() == 0


def test_streamed_deltas_join_to_the_final_text(setup):
    loaded, engine, pix = setup
    ids = build_prompt_ids(loaded, "Describe it", with_image=True)
    req = engine.submit(ids, pix[0], SamplingParams(max_tokens=30))
    events = list(req.events(120))
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    fin = events[-1]
    assert isinstance(fin, FinishEvent) and [e.token_id for e in tokens] == fin.token_ids
    assert "".join(e.text for e in tokens) + fin.text_delta == fin.text
    assert fin.text == loaded.tokenizer.decode(fin.token_ids, skip_special_tokens=True).split("</s>")[0].strip()


def test_text_tracker_holds_back_a_partial_stop_string():
    class Tok:  # one character per token id
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    tr = TextTracker(Tok(), ["###"])
    seen = [tr.delta([ord(c) for c in " ab#"[: k + 1]]) for k in range(4)]
    assert seen == ["", "a", "b", ""]  # leading space dropped, "#" held back
    toks = [ord(c) for c in " ab#c##"]
    assert tr.delta(toks) == "#c"
    final = [ord(c) for c in " ab#c###x"]
    assert tr.final(final) == "ab#c" and tr.rest(final) == ""


def test_sampling_with_a_seed_repeats_and_cancel_frees_the_slot(setup):
    loaded, engine, pix = setup
    ids = build_prompt_ids(loaded, "hi", with_image=False)
    params = SamplingParams(max_tokens=12, temperature=1.5, top_p=0.9, seed=3)
    a = engine.submit(ids, None, params).result(120)
    b = engine.submit(ids, None, params).result(120)
    assert a.token_ids == b.token_ids
    long = engine.submit(ids, None, SamplingParams(max_tokens=150))
    next(long.events(120))  # admitted and decoding
    long.cancel()
    fin = long.result(120)
    assert fin.reason == "cancelled" and len(fin.token_ids) < 150
    assert engine.active() == 0


def test_bad_requests_are_named_errors(setup):
    loaded, engine, _ = setup
    with pytest.raises(ContextLengthError):
        engine.submit([1] * 250, None, SamplingParams(max_tokens=10))
    with pytest.raises(EngineError, match="max_tokens"):
        engine.submit([1, 2], None, SamplingParams(max_tokens=256))
    with pytest.raises(EngineError, match="top_p"):
        engine.submit([1, 2], None, SamplingParams(max_tokens=2, top_p=0.0))
    e2 = Engine(loaded, max_batch=1, max_len=64).start()
    e2.stop(30)
    with pytest.raises(ShuttingDownError):
        e2.submit([1, 2], None, SamplingParams(max_tokens=2))
