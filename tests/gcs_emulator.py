"""A local Google Cloud Storage emulator for tests (the `gcp-storage-emulator` package, in memory, on 127.0.0.1).

Every client is pointed at it through its documented setting, in this process and in the subprocesses that
inherit `os.environ`:
  gcsfs / etils.epath / google-cloud-storage (tensorboardX)   STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT
  gcsfs credentials                                            FSSPEC_GS_TOKEN / FSSPEC_GCS_TOKEN=anon (fsspec's
                                                               per-protocol config; etils.epath asks for "gcs")
  gcsfs's bucket-layout probe over gRPC (60 s per bucket)     GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
  TensorStore (Orbax's array writes)                           TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT,
                                                               GOOGLE_AUTH_TOKEN_FOR_TESTING=<any token>
The emulator runs in the test process; one gap of it is filled here (see `_send_generation_on_download`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
from collections.abc import Iterator


@dataclasses.dataclass
class Emulator:
    port: int
    bucket: str
    env: dict[str, str]

    def uri(self, *parts: str) -> str:
        return "/".join([f"gs://{self.bucket}", *parts])


def _send_generation_on_download() -> None:
    """Makes the emulator's media downloads carry `x-goog-generation`, as real GCS does: TensorStore (Orbax's
    array writes, OCDBT manifests) reads an object's generation from that header and rejects a download without
    it ("Malformed StorageGeneration"). Idempotent. The emulator still ignores ifGenerationMatch preconditions,
    so concurrent-writer conflicts are not exercised here (one writer per checkpoint in these tests)."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    if getattr(objects.download, "_sends_generation", False):
        return
    original = objects.download

    def download(request, response, storage, *args, **kwargs):
        original(request, response, storage, *args, **kwargs)
        if response.status.value in (200, 206):
            try:
                obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
                response["x-goog-generation"] = str(obj["generation"])
                response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
            except Exception:  # noqa: BLE001 - no metadata: leave the response as it is
                pass

    download._sends_generation = True
    objects.download = download
    for _, handlers in server.HANDLERS:
        for method, fn in list(handlers.items()):
            if fn is original:
                handlers[method] = download


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_emulator(bucket: str = "llava-test") -> Iterator[Emulator]:
    """Starts the emulator with one bucket, sets the client settings in os.environ (restored on exit)."""
    import fsspec
    from gcp_storage_emulator.server import create_server

    logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)
    _send_generation_on_download()
    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "FSSPEC_GS_TOKEN": "anon", "FSSPEC_GCS_TOKEN": "anon",
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "GOOGLE_CLOUD_PROJECT": "test"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    saved_conf = {k: fsspec.config.conf.get(k) for k in ("gs", "gcs")}
    for k in saved_conf:  # this process read FSSPEC_* at import already; etils.epath asks for "gcs"
        fsspec.config.conf[k] = {"token": "anon"}
    import gcsfs
    from etils.epath import backend

    def forget_clients() -> None:  # cached gcsfs instances keep the endpoint they were made with
        gcsfs.GCSFileSystem.clear_instance_cache()
        backend.fsspec_backend._get_filesystem.cache_clear()

    forget_clients()
    try:
        yield Emulator(port, bucket, env)
    finally:
        forget_clients()
        for k, v in saved_conf.items():
            if v is None:
                fsspec.config.conf.pop(k, None)
            else:
                fsspec.config.conf[k] = v
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
