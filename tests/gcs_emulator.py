"""A local Google Cloud Storage emulator for tests (the `gcp-storage-emulator` package, in memory, on 127.0.0.1).

Every client is pointed at it through its documented setting, in this process and in the subprocesses that
inherit `os.environ`:
  gcsfs / etils.epath / google-cloud-storage (tensorboardX)   STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT
  gcsfs credentials                                            FSSPEC_GS_TOKEN=anon (fsspec's per-protocol config)
  gcsfs's bucket-layout probe over gRPC (60 s per bucket)     GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
  TensorStore (Orbax's array writes)                           TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT,
                                                               GOOGLE_AUTH_TOKEN_FOR_TESTING=<any token>
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
    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "FSSPEC_GS_TOKEN": "anon",
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "GOOGLE_CLOUD_PROJECT": "test"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    saved_conf = fsspec.config.conf.get("gs")
    fsspec.config.conf["gs"] = {"token": "anon"}  # this process read FSSPEC_* at import already
    import gcsfs

    gcsfs.GCSFileSystem.clear_instance_cache()
    try:
        yield Emulator(port, bucket, env)
    finally:
        gcsfs.GCSFileSystem.clear_instance_cache()
        if saved_conf is None:
            fsspec.config.conf.pop("gs", None)
        else:
            fsspec.config.conf["gs"] = saved_conf
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
