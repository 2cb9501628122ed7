"""A local OpenAI-compatible HTTP server for tests: real sockets on 127.0.0.1, scripted replies.

Usage:

    def handler(request_json: dict, n: int) -> Reply:
        return Reply(body=chat_completion("hello"))

    with LocalOpenAIServer(handler) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="k")
        ...
        server.requests   # every request received, in arrival order

`handler(request_json, n)` answers POST .../chat/completions; `n` is the 0-based arrival number of that chat
request. A `Reply` can carry any status, a dict body (sent as JSON) or a str body (sent verbatim, e.g. malformed
JSON), extra headers (e.g. Retry-After), a delay before answering, or `drop=True` to close the socket with no
answer, or `chunk_delay_s` to trickle the body out slowly. The server also emulates the Files and Batch endpoints (`/files`, `/files/{id}/content`, `/batches`,
`/batches/{id}`): a batch's lines are answered by the same handler when the batch is created, and the batch
reports `in_progress` for `batch_polls_before_done` retrievals before `completed`.
"""

from __future__ import annotations

import dataclasses
import email.parser
import email.policy
import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclasses.dataclass
class Reply:
    """One scripted answer: HTTP status, body (dict -> JSON, str -> raw text), headers, delay, or a dropped socket."""

    status: int = 200
    body: dict | str = dataclasses.field(default_factory=dict)
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    delay_s: float = 0.0
    drop: bool = False
    chunk_delay_s: float = 0.0  # > 0: send the body in 8 pieces with this pause between them (a trickling server)


@dataclasses.dataclass
class LoggedRequest:
    """One request as the server saw it. `json` is None when the body was not JSON (file uploads)."""

    n: int
    method: str
    path: str
    headers: dict[str, str]
    json: Any
    time: float


Handler = Callable[[dict, int], Reply]


def chat_completion(
    text: str,
    *,
    model: str = "local-test-model",
    prompt_tokens: int = 10,
    completion_tokens: int | None = None,
    finish_reason: str = "stop",
) -> dict:
    """Builds a normal chat.completion body whose single choice says `text`."""
    if completion_tokens is None:
        completion_tokens = max(1, len(text.split()))
    return {
        "id": f"chatcmpl-local-{abs(hash(text)) % 10**12}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def error_body(message: str, *, type_: str = "invalid_request_error", code: str | None = None) -> dict:
    """Builds an OpenAI-style error body."""
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def echo_handler(request_json: dict, n: int) -> Reply:
    """Answers every chat request with the text of its last message."""
    return Reply(body=chat_completion(str(request_json["messages"][-1]["content"])))


class LocalOpenAIServer:
    """Context manager running an OpenAI-compatible server on 127.0.0.1 in a background thread.

    `base_url` ends in "/v1". `requests` lists every `LoggedRequest`; `chat_requests()` only the chat ones.
    When `expected_api_key` is set, requests whose bearer token differs get a 401 without reaching the handler.
    """

    def __init__(
        self,
        handler: Handler = echo_handler,
        *,
        expected_api_key: str | None = None,
        batch_polls_before_done: int = 1,
    ):
        self.handler = handler
        self.expected_api_key = expected_api_key
        self.batch_polls_before_done = batch_polls_before_done
        self.requests: list[LoggedRequest] = []
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._chat_count = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------

    def __enter__(self) -> LocalOpenAIServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Binds a free port and starts serving."""
        server = self

        class _RequestHandler(_Handler):
            owner = server

        self._httpd = _QuietServer(("127.0.0.1", 0), _RequestHandler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops serving and closes the socket."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- bookkeeping ---------------------------------------------------------------------------------------

    def chat_requests(self) -> list[LoggedRequest]:
        """The logged chat-completion requests, in arrival order."""
        with self._lock:
            return [r for r in self.requests if r.path.endswith("/chat/completions")]

    def _log(self, method: str, path: str, headers: dict[str, str], body_json: Any) -> LoggedRequest:
        with self._lock:
            entry = LoggedRequest(len(self.requests), method, path, headers, body_json, time.time())
            self.requests.append(entry)
            return entry

    def _next_chat_number(self) -> int:
        with self._lock:
            n = self._chat_count
            self._chat_count += 1
            return n

    def _new_id(self, prefix: str) -> str:
        with self._lock:
            return f"{prefix}-{len(self.files) + len(self.batches) + 1}"

    # -- batch emulation -----------------------------------------------------------------------------------

    def _run_batch_lines(self, input_bytes: bytes) -> tuple[bytes, bytes, dict]:
        out_lines, err_lines = [], []
        counts = {"total": 0, "completed": 0, "failed": 0}
        for line in input_bytes.decode("utf-8").splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            counts["total"] += 1
            reply = self.handler(item["body"], self._next_chat_number())
            body = reply.body if isinstance(reply.body, dict) else {"raw": reply.body}
            row = {
                "id": f"batch_req_{counts['total']}",
                "custom_id": item["custom_id"],
                "response": {"status_code": reply.status, "request_id": f"req_{counts['total']}", "body": body},
                "error": None,
            }
            if reply.status == 200:
                counts["completed"] += 1
                out_lines.append(json.dumps(row))
            else:
                counts["failed"] += 1
                err_lines.append(json.dumps(row))
        return ("\n".join(out_lines) + "\n").encode(), ("\n".join(err_lines) + "\n").encode(), counts


class _QuietServer(ThreadingHTTPServer):
    """Does not print tracebacks for clients that hang up (timeouts, killed processes)."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def _file_object(file_id: str, size: int, purpose: str, filename: str) -> dict:
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "created_at": int(time.time()),
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
    }


class _Handler(BaseHTTPRequestHandler):
    owner: LocalOpenAIServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence default stderr logging
        return

    # -- plumbing ------------------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: dict | str | bytes, headers: dict[str, str] | None = None,
              chunk_delay_s: float = 0.0) -> None:
        if isinstance(body, dict):
            data = json.dumps(body).encode()
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = body
        try:
            self.send_response(status)
            headers = dict(headers or {})
            if not any(k.lower() == "content-type" for k in headers):
                headers["Content-Type"] = "application/json"
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if chunk_delay_s > 0:
                step = max(1, -(-len(data) // 8))
                for start in range(0, len(data), step):
                    self.wfile.write(data[start:start + step])
                    self.wfile.flush()
                    time.sleep(chunk_delay_s)
            else:
                self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _authorized(self) -> bool:
        expected = self.owner.expected_api_key
        if expected is None:
            return True
        return self.headers.get("Authorization", "") == f"Bearer {expected}"

    # -- routes --------------------------------------------------------------------------------------------

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        raw = self._read_body()
        headers = {k: v for k, v in self.headers.items()}
        content_type = self.headers.get("Content-Type", "")
        body_json = None
        if "json" in content_type:
            try:
                body_json = json.loads(raw or b"null")
            except json.JSONDecodeError:
                self.owner._log("POST", self.path, headers, None)
                self._send(400, {"error": {"message": "request body is not JSON", "type": "invalid_request_error"}})
                return
        self.owner._log("POST", self.path, headers, body_json)
        if not self._authorized():
            self._send(401, {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                                       "code": "invalid_api_key"}})
            return
        path = self.path.split("?")[0].rstrip("/")
        if path.endswith("/chat/completions"):
            self._chat(body_json)
        elif path.endswith("/files"):
            self._upload(raw, content_type)
        elif path.endswith("/batches"):
            self._create_batch(body_json)
        else:
            self._send(404, {"error": {"message": f"unknown path {self.path}", "type": "invalid_request_error"}})

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        headers = {k: v for k, v in self.headers.items()}
        self.owner._log("GET", self.path, headers, None)
        if not self._authorized():
            self._send(401, {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error"}})
            return
        parts = self.path.split("?")[0].rstrip("/").split("/")
        if len(parts) >= 2 and parts[-2] == "batches":
            self._retrieve_batch(parts[-1])
        elif len(parts) >= 3 and parts[-1] == "content" and parts[-3] == "files":
            data = self.owner.files.get(parts[-2])
            if data is None:
                self._send(404, {"error": {"message": "no such file", "type": "invalid_request_error"}})
            else:
                self._send(200, data, {"Content-Type": "application/octet-stream"})
        else:
            self._send(404, {"error": {"message": f"unknown path {self.path}", "type": "invalid_request_error"}})

    def _chat(self, body_json: Any) -> None:
        if not isinstance(body_json, dict) or "messages" not in body_json:
            self._send(400, {"error": {"message": "missing messages", "type": "invalid_request_error"}})
            return
        reply = self.owner.handler(body_json, self.owner._next_chat_number())
        if reply.delay_s > 0:
            time.sleep(reply.delay_s)
        if reply.drop:
            self._drop()
            return
        self._send(reply.status, reply.body, reply.headers, reply.chunk_delay_s)

    def _upload(self, raw: bytes, content_type: str) -> None:
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw
        )
        fields: dict[str, tuple[str | None, bytes]] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            fields[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
        if "file" not in fields:
            self._send(400, {"error": {"message": "no file field", "type": "invalid_request_error"}})
            return
        filename, data = fields["file"]
        purpose = fields.get("purpose", (None, b"batch"))[1].decode()
        file_id = self.owner._new_id("file")
        self.owner.files[file_id] = data
        self._send(200, _file_object(file_id, len(data), purpose, filename or "upload.jsonl"))

    def _create_batch(self, body_json: Any) -> None:
        input_id = (body_json or {}).get("input_file_id")
        if input_id not in self.owner.files:
            self._send(404, {"error": {"message": "no such input file", "type": "invalid_request_error"}})
            return
        out, err, counts = self.owner._run_batch_lines(self.owner.files[input_id])
        batch_id = self.owner._new_id("batch")
        out_id, err_id = f"{batch_id}-output", f"{batch_id}-errors"
        self.owner.files[out_id] = out
        self.owner.files[err_id] = err
        batch = {
            "id": batch_id,
            "object": "batch",
            "endpoint": body_json.get("endpoint"),
            "input_file_id": input_id,
            "completion_window": body_json.get("completion_window", "24h"),
            "status": "validating",
            "created_at": int(time.time()),
            "request_counts": counts,
            "_polls": 0,
            "_output_file_id": out_id if counts["completed"] else None,
            "_error_file_id": err_id if counts["failed"] else None,
        }
        self.owner.batches[batch_id] = batch
        self._send(200, _public_batch(batch))

    def _retrieve_batch(self, batch_id: str) -> None:
        batch = self.owner.batches.get(batch_id)
        if batch is None:
            self._send(404, {"error": {"message": "no such batch", "type": "invalid_request_error"}})
            return
        batch["_polls"] += 1
        if batch["_polls"] > self.owner.batch_polls_before_done:
            batch["status"] = "completed"
            batch["output_file_id"] = batch["_output_file_id"]
            batch["error_file_id"] = batch["_error_file_id"]
        else:
            batch["status"] = "in_progress"
        self._send(200, _public_batch(batch))


def _public_batch(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if not k.startswith("_")}
