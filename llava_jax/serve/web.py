"""The chat web page (Gradio, as LLaVA's own demo), served at `/` by the API's process and engine.

Upload an image, chat over several turns with the answer streamed token by token, set temperature and the
number of new tokens. The page builds the same conversation as the API (the image at the start of the first
user turn) and decodes through the same engine, so it shares the slots with API clients.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page never phones home

import gradio as gr  # noqa: E402

from llava_jax.data import images  # noqa: E402
from llava_jax.serve.app import Service
from llava_jax.serve.engine import FinishEvent, SamplingParams
from llava_jax.serve.protocol import APIError, ChatRequest, prompt_ids_of


def _history(turns: list[tuple[str, str]]) -> list[dict[str, str]]:
    out = []
    for q, a in turns:
        out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return out


def build_page(service: Service) -> gr.Blocks:
    """The Gradio Blocks of the chat page (elem ids: image, prompt, send, clear, chat, temperature,
    max-tokens)."""
    limit = max(1, min(1024, service.engine.max_len // 2))
    with gr.Blocks(title="llava_jax chat") as page:
        gr.Markdown(f"### llava_jax chat — `{service.model_name}`")
        turns_state = gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", format="png", label="Image", sources=["upload"],
                                 elem_id="image", height=280)
                temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature",
                                        elem_id="temperature")
                max_tokens = gr.Slider(1, limit, value=min(128, limit), step=1, label="Max new tokens",
                                       elem_id="max-tokens")
            with gr.Column(scale=2):
                chat = gr.Chatbot(label="Chat", elem_id="chat", height=420)
                prompt = gr.Textbox(placeholder="Ask about the image and press Enter", show_label=False,
                                    elem_id="prompt")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear = gr.Button("Clear", elem_id="clear")

        async def respond(message, turns, image_path, temp, n_new):
            message = (message or "").strip()
            if not message:
                yield _history(turns), turns, ""
                return
            turns = list(turns) + [(message, "")]
            yield _history(turns), turns, ""
            try:
                pixels = None
                if image_path:
                    if service.loaded.image_config is None:
                        raise APIError("this model takes no images")
                    pixels = images.preprocess(images.load_rgb(image_path, service.images_from.max_pixels),
                                               service.loaded.image_config)
                convo = []
                for q, a in turns[:-1]:
                    if a.strip() and not a.startswith("(error:"):  # only answered turns are history
                        convo += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
                convo.append({"from": "human", "value": message})
                with service.lock:
                    ids = prompt_ids_of(service.loaded, convo, pixels is not None)
                n = int(min(n_new, service.engine.max_len - len(ids)))
                if n < 1:
                    raise APIError("the conversation is longer than the context; press Clear")
                req = ChatRequest(service.model_name, ids, pixels,
                                  SamplingParams(max_tokens=n, temperature=float(temp)), True, False, False)
                text = ""
                async for ev in service.events(req):
                    text += ev.text_delta if isinstance(ev, FinishEvent) else ev.text
                    if isinstance(ev, FinishEvent):
                        text = ev.text if ev.reason != "error" else f"(error: {ev.error})"
                    turns[-1] = (message, text)
                    yield _history(turns), turns, ""
            except (APIError, images.ImageError, ValueError) as e:
                turns[-1] = (message, f"(error: {e})")
                yield _history(turns), turns, ""

        inputs = [prompt, turns_state, image, temperature, max_tokens]
        outputs = [chat, turns_state, prompt]
        prompt.submit(respond, inputs, outputs)
        send.click(respond, inputs, outputs)
        clear.click(lambda: ([], [], ""), None, outputs)
    return page


def mount(app, service: Service, api_key: str | None = None):
    """Mounts the page at `/` (after the API routes, which keep precedence). With an API key, the page asks
    for it as the password of a login form."""
    auth = None
    if api_key is not None:
        import hmac

        def auth(_user: str, password: str) -> bool:
            return hmac.compare_digest(password.encode(), api_key.encode())
    return gr.mount_gradio_app(app, build_page(service), path="/", auth=auth)
