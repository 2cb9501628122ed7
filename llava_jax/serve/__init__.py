"""Serving a LLaVA model: `python -m llava_jax.serve`.

  engine.py    slot KV cache + continuous batching (jitted prefill-into-slot and decode steps)
  protocol.py  OpenAI chat-completions requests -> engine inputs; OpenAI error bodies (APIError)
  app.py       the FastAPI app: /v1/chat/completions (SSE streaming), /v1/models, /health
  web.py       the Gradio chat page mounted at /
  __main__.py  the command line: load, warm up, serve with uvicorn, drain on SIGTERM
"""
