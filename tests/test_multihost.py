"""Multi-host start (llava_jax.multihost): TPU-slice detection from the environment, the automatic
jax.distributed start it triggers (flags win), and the shared-workdir check with two jax.distributed processes on
127.0.0.1 - a per-process workdir is refused with a named error, a shared one passes.

The two-process runs stop right after the check (the model path does not exist), so each costs only the JAX
import and start; the full two-process training on a shared workdir is tests/test_train_cli.py's
test_two_processes_match_one.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from llava_jax import multihost

REPO = Path(__file__).resolve().parents[1]


def test_slice_hosts_from_the_environment():
    assert multihost.tpu_slice_hosts({"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1,t1v-2,t1v-3"}) == 4
    assert multihost.tpu_slice_hosts({"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476",
                                      "TPU_WORKER_HOSTNAMES": "a"}) == 2
    assert multihost.tpu_slice_hosts({"TPU_WORKER_HOSTNAMES": "a,b", "MEGASCALE_NUM_SLICES": "2"}) == 4
    assert multihost.tpu_slice_hosts({"TPU_SKIP_MDS_QUERY": "1"}) == 0
    assert multihost.tpu_slice_hosts({"TPU_WORKER_HOSTNAMES": "WARNING: could not determine TPU worker hostnames, "
                                                              "please set it", "TPU_SKIP_MDS_QUERY": "1"}) == 0
    assert multihost.tpu_slice_hosts({}) == 0  # this CPU host has no TPU chips on its PCI bus


def _distributed(**kw) -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict(dict(enabled=False, auto=True, coordinator_address="", num_processes=-1,
                                       process_id=-1))
    d.update(kw)
    return d


def test_slice_starts_distributed_and_flags_win(monkeypatch):
    calls = []
    monkeypatch.setattr(multihost.jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(multihost.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    slice_env = {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}
    assert multihost.maybe_initialize_distributed(_distributed(), slice_env) == "tpu-slice"
    assert calls == [{}]  # JAX reads coordinator, count and id from the TPU environment itself
    assert multihost.maybe_initialize_distributed(_distributed(auto=False), slice_env) == ""
    assert multihost.maybe_initialize_distributed(_distributed(), {"TPU_WORKER_HOSTNAMES": "w0"}) == ""
    assert multihost.maybe_initialize_distributed(_distributed(coordinator_address="10.0.0.1:1234", num_processes=4,
                                                               process_id=2), slice_env) == "flags"
    assert calls[-1] == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}
    assert len(calls) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(cwds: list[Path]) -> list[subprocess.CompletedProcess]:
    """Two trainer processes, same command line (relative --workdir=run), started in `cwds`."""
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    procs = []
    for pid, cwd in enumerate(cwds):
        cmd = [sys.executable, "-m", "llava_jax.train", f"--config={REPO / 'configs' / 'pretrain.py'}:demo",
               "--workdir=run", f"--config.init_from={cwd / 'no-such-model'}", "--config.distributed.enabled=true",
               f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2",
               f"--config.distributed.process_id={pid}", "--config.batch_size=2"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                      cwd=cwd))
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        outs.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return outs


def test_unshared_workdir_is_refused_and_shared_one_passes(tmp_path):
    hosts = [tmp_path / "host0", tmp_path / "host1"]  # "run" resolves to a different directory in each process
    for h in hosts:
        h.mkdir()
    for proc in _two_processes(hosts):
        assert proc.returncode == 2, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: workdir ") and "is not shared: process(es) [1] of 2" in last, last
    shared = tmp_path / "shared"
    shared.mkdir()
    for proc in _two_processes([shared, shared]):  # one directory: the check passes, the model load fails
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "does not exist" in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert (shared / "run").is_dir() and not (shared / "run" / multihost.TOKEN_NAME).exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
