"""`python -m llava_jax.serve`: the OpenAI-compatible server and the chat web page for one model.

  python -m llava_jax.serve --model PATH_OR_WORKDIR [--host 127.0.0.1] [--port 8000] [--max-batch 16]
      [--max-len N] [--image-root DIR] [--api-key-env NAME] [--name NAME] [--no-web]

Loads the model, starts the engine and compiles its decode step before listening. SIGTERM (or Ctrl-C) stops
admitting requests, lets the ones in flight finish, then exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from llava_jax import cli, host_memory


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m llava_jax.serve",
                           description="Serve a LLaVA model: OpenAI chat completions + a chat web page.")
    p.add_argument("--model", required=True, help="HF LLaVA dir, llava_jax model dir, or training workdir")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="KV-cache slots decoded together")
    p.add_argument("--max-len", type=int, default=None,
                   help="context length: prompt + max_tokens (default: the model's, at most 4096)")
    p.add_argument("--image-root", default=None, help="image_url paths are read under this directory only")
    p.add_argument("--api-key-env", default=None, help="name of the environment variable holding the API key")
    p.add_argument("--name", default=None, help="the model name clients send (default: the model dir's name)")
    p.add_argument("--max-image-pixels", type=int, default=None, help="refuse larger images (width x height)")
    p.add_argument("--no-web", action="store_true", help="serve the API only, no web page")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def _check_bind(host: str, port: int) -> None:
    """Raises UsageError when (host, port) cannot be listened on (busy port, unknown address)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, addr = infos[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr)
    except OSError as e:
        raise cli.UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise cli.UsageError(f"--port must be in 0..65535, got {args.port}")
    if args.max_batch < 1:
        raise cli.UsageError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.image_root is not None and not Path(args.image_root).is_dir():
        raise NotADirectoryError(20, "not a directory", args.image_root)
    api_key = None
    if args.api_key_env is not None:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise cli.UsageError(f"--api-key-env {args.api_key_env}: that environment variable is not set")
    _check_bind(args.host, args.port)  # before the model loads: a busy port fails fast
    host_memory.retain_freed_memory()  # XLA:CPU: reuse freed pages (before JAX's backend starts)

    import uvicorn

    from llava_jax.convert.model_dir import load_model
    from llava_jax.data import images
    from llava_jax.serve.app import Service, create_app
    from llava_jax.serve.engine import Engine, SamplingParams
    from llava_jax.serve.protocol import ImageSource

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("llava_jax.serve")
    loaded = load_model(args.model)
    if loaded.tokenizer is None:
        raise cli.UsageError(f"{args.model} has no tokenizer")
    engine = Engine(loaded, max_batch=args.max_batch, max_len=args.max_len).start()
    # compiles the decode step (and a text prefill) in the engine thread while the app is built
    warm = engine.submit(loaded.tokenizer("hello").input_ids, None, SamplingParams(max_tokens=2))
    name = args.name or Path(args.model).resolve().name
    max_pixels = args.max_image_pixels or images.DEFAULT_MAX_PIXELS
    service = Service(engine, name, ImageSource(loaded.image_config, args.image_root, max_pixels))
    app = create_app(service, api_key)
    if not args.no_web:
        from llava_jax.serve.web import mount

        app = mount(app, service, api_key)
    warm = warm.result()
    if warm.reason == "error":
        raise RuntimeError(f"the engine failed its warm-up: {warm.error}")

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # drain instead of re-raising the signal: exit 0 when done
            engine.drain()
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            else:
                self.should_exit = True

    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                   timeout_graceful_shutdown=None))
    log.info("serving %s as %r on http://%s:%d (max batch %d, context %d)%s", args.model, name, args.host,
             args.port, engine.max_batch, engine.max_len, "" if api_key is None else ", API key required")
    server.run()
    engine.stop(60)
    if not server.started:
        raise cli.UsageError(f"could not listen on {args.host}:{args.port}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
