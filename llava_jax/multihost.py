"""Multi-host start: find a multi-host TPU slice, initialise jax.distributed, and check the workdir is shared.

On a Cloud TPU slice with more than one host (v5p-16 and up, v4-16 and up, multislice) every host runs the same
command; `maybe_initialize_distributed` then calls `jax.distributed.initialize()` by itself (JAX finds the
coordinator, process count and id from the TPU metadata). Explicit settings (`distributed.enabled`,
`distributed.coordinator_address`, `num_processes`, `process_id`, or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES
/ JAX_PROCESS_ID environment) win; `distributed.auto=False` turns the detection off.

With more than one process the checkpoints are written collectively, so the workdir must be one directory every
process sees (a gs:// bucket, or a shared filesystem such as NFS / Filestore). `check_shared_workdir` proves it:
process 0 writes a token file holding a random nonce, publishes the nonce through the jax.distributed key-value
store, and every process reads the file back; if any process cannot, all of them stop with UnsharedWorkdirError.
"""

from __future__ import annotations

import logging
import os
import secrets
import urllib.request
from typing import Any

import jax

from llava_jax.train_config import ConfigError

log = logging.getLogger(__name__)

TOKEN_NAME = ".llava_jax_shared_check"
_METADATA = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/"
_TIMEOUT_MS = 120_000


class UnsharedWorkdirError(ConfigError):
    """The workdir is not one directory that every process sees (e.g. a local path on a multi-host slice)."""


def _tpu_chips_on_host() -> int:
    """Number of TPU chips on this host's PCI bus (0 on CPU / GPU hosts)."""
    try:
        from jax._src import hardware_utils

        return int(hardware_utils.num_available_tpu_chips_and_device_id()[0])
    except Exception:  # noqa: BLE001 - a JAX without the helper: no detection by PCI
        return 0


def _metadata(key: str, timeout_s: float = 2.0) -> str | None:
    """A Cloud TPU VM metadata attribute, or None when there is no metadata server (not on Cloud TPU)."""
    req = urllib.request.Request(_METADATA + key, headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:  # noqa: S310 - the fixed GCE metadata address
            return r.read().decode()
    except OSError:
        return None


def tpu_slice_hosts(env: dict[str, str] | None = None) -> int:
    """How many hosts (JAX processes) the TPU slice this host belongs to has: 0 when not on Cloud TPU.

    Reads, in order: TPU_PROCESS_ADDRESSES / TPU_WORKER_HOSTNAMES (GKE, or set by hand), then on a TPU VM the
    metadata server's worker-network-endpoints; multiplied by MEGASCALE_NUM_SLICES for multislice.
    """
    env = os.environ if env is None else env
    slices = int(env.get("MEGASCALE_NUM_SLICES", "1") or 1)
    names = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    hosts = [n.strip() for n in names.split(",") if n.strip()]
    if hosts and not any(" " in h for h in hosts):  # (libtpu may leave a warning sentence in the variable)
        return len(hosts) * slices
    if env.get("TPU_SKIP_MDS_QUERY") is not None or _tpu_chips_on_host() == 0:
        return 0
    endpoints = _metadata("worker-network-endpoints")
    if not endpoints:
        return 1 * slices
    return len([e for e in endpoints.split(",") if e.strip()]) * slices


def maybe_initialize_distributed(d: Any, env: dict[str, str] | None = None) -> str:
    """Initialises jax.distributed when configured (`d` is the config's `distributed` block) or on a
    multi-host TPU slice. Returns how: 'flags', 'tpu-slice', 'already' or '' (single process)."""
    env = os.environ if env is None else env
    if jax.distributed.is_initialized():
        return "already"
    env_coord = env.get("JAX_COORDINATOR_ADDRESS", "")
    if d.enabled or d.coordinator_address or env_coord:
        kwargs: dict[str, Any] = {}
        if d.coordinator_address or env_coord:
            kwargs["coordinator_address"] = d.coordinator_address or env_coord
        num = d.num_processes if d.num_processes > 0 else int(env.get("JAX_NUM_PROCESSES", "-1"))
        pid = d.process_id if d.process_id >= 0 else int(env.get("JAX_PROCESS_ID", "-1"))
        if num > 0:
            kwargs["num_processes"] = num
        if pid >= 0:
            kwargs["process_id"] = pid
        if jax.config.jax_platforms in ("cpu",) or env.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(**kwargs)
        return "flags"
    if d.get("auto", True) and tpu_slice_hosts(env) > 1:
        jax.distributed.initialize()  # JAX reads coordinator, process count and id from the TPU metadata
        return "tpu-slice"
    return ""


def _kv_client() -> Any:
    from jax._src import distributed

    return distributed.global_state.client


def check_shared_workdir(workdir: Any) -> None:
    """Raises UnsharedWorkdirError unless every JAX process sees the same `workdir` (an etils Path, created).

    A no-op with one process. All processes must call it (it synchronises them)."""
    n = jax.process_count()
    if n <= 1:
        return
    client = _kv_client()
    token = workdir / TOKEN_NAME
    me = jax.process_index()
    if me == 0:
        nonce = secrets.token_hex(16)
        token.write_text(nonce)
        client.key_value_set("llava_jax/workdir_nonce", nonce)
    nonce = client.blocking_key_value_get("llava_jax/workdir_nonce", _TIMEOUT_MS)
    try:
        seen = token.exists() and token.read_text().strip() == nonce
    except OSError:
        seen = False
    client.key_value_set(f"llava_jax/workdir_seen/{me}", "1" if seen else "0")
    missing = [p for p in range(n) if client.blocking_key_value_get(f"llava_jax/workdir_seen/{p}", _TIMEOUT_MS) != "1"]
    client.wait_at_barrier("llava_jax/workdir_checked", _TIMEOUT_MS)
    if me == 0:
        token.unlink(missing_ok=True)
    if missing:
        raise UnsharedWorkdirError(
            f"workdir {workdir} is not shared: process(es) {missing} of {n} do not see the file process 0 wrote "
            f"there; with several processes the workdir must be one directory every host sees (a gs://bucket/path "
            f"or a shared filesystem), not a local disk")
