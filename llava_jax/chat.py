"""`python -m llava_jax.chat`: a multi-turn chat in the terminal about one image, answers streamed token by
token (as LLaVA's CLI).

  python -m llava_jax.chat --model PATH [--image IMG] [--max-new-tokens 256] [--temperature 0]

Each user line is a turn; the whole conversation is encoded with the model's template (the training encoding,
the image at the start of the first turn) and decoded by the serving engine. An empty line, `exit`, `quit`
or end of input ends the chat.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from llava_jax import cli, host_memory


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m llava_jax.chat", description="Chat with a LLaVA model in the terminal.")
    p.add_argument("--model", required=True, help="HF LLaVA dir, llava_jax model dir, or training workdir")
    p.add_argument("--image", help="image file to talk about (omit for a text-only chat)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-len", type=int, default=None, help="context length (default: the model's, at most 4096)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        raise cli.UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise cli.UsageError("--temperature must be >= 0 and --top-p in (0, 1]")
    host_memory.retain_freed_memory()

    from llava_jax.convert.model_dir import load_model
    from llava_jax.data import images
    from llava_jax.serve.engine import Engine, EngineError, FinishEvent, SamplingParams
    from llava_jax.serve.protocol import APIError, prompt_ids_of

    loaded = load_model(args.model)
    if loaded.tokenizer is None:
        raise cli.UsageError(f"{args.model} has no tokenizer")
    pixels = None
    if args.image:
        if loaded.image_config is None:
            raise cli.UsageError(f"{args.model} has no image preprocessing config")
        pixels = images.load_and_preprocess(args.image, loaded.image_config)
    engine = Engine(loaded, max_batch=1, max_len=args.max_len).start()
    turns: list[dict[str, str]] = []
    try:
        while True:
            try:
                line = input("USER: ")
            except EOFError:
                print()
                break
            line = line.strip()
            if line in ("", "exit", "quit"):
                break
            convo = turns + [{"from": "human", "value": line}]
            try:
                ids = prompt_ids_of(loaded, convo, pixels is not None)
                n = min(args.max_new_tokens, engine.max_len - len(ids))
                req = engine.submit(ids, pixels, SamplingParams(max_tokens=n, temperature=args.temperature,
                                                                top_p=args.top_p))
            except (APIError, EngineError) as e:
                print(f"(not sent: {e}; the conversation may be longer than the context)", file=sys.stderr)
                continue
            print("ASSISTANT: ", end="", flush=True)
            for ev in req.events():
                print(ev.text_delta if isinstance(ev, FinishEvent) else ev.text, end="", flush=True)
            print(flush=True)
            if ev.reason == "error":
                raise RuntimeError(f"generation failed: {ev.error}")
            if ev.text.strip():  # an empty answer cannot be a turn of the template; the question is dropped
                turns = convo + [{"from": "gpt", "value": ev.text}]
    except KeyboardInterrupt:
        print()
    finally:
        engine.stop(30)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
