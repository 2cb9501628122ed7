"""`host_memory.retain_freed_memory`: the modes, the backend-order guard, and the effect it exists for —
a repeated XLA:CPU program stops page-faulting its buffers in again once freed memory is retained."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import pytest

from llava_jax import host_memory

_PROBE = textwrap.dedent("""
    import json, resource, sys
    from llava_jax import host_memory
    applied = host_memory.retain_freed_memory(sys.argv[1])
    import jax, jax.numpy as jnp
    x = jnp.ones((4096, 4096), jnp.float32)  # 64 MB buffers (above glibc's largest mmap threshold), 16384 pages
    f = jax.jit(lambda x: jnp.sin(x) * 2.0 + x)
    faults = []
    for _ in range(24):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        y = f(x)
        y.block_until_ready()
        del y
        faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 16384)
    print(json.dumps({"applied": applied, "late": faults[-6:]}))
""")


def _probe(mode: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env=env,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator settings")
def test_retained_memory_stops_repeated_page_faults():
    system, retained = _probe("system"), _probe("retain")
    assert not system["applied"] and retained["applied"]
    # the system allocator maps every output afresh (one fault per page); retained memory is reused
    assert sum(system["late"]) / len(system["late"]) > 0.5
    assert max(retained["late"]) < 0.1


def test_modes_and_the_backend_order_guard(caplog):
    with pytest.raises(host_memory.HostMemoryError, match="unknown host memory mode 'fast'"):
        host_memory.retain_freed_memory("fast")
    assert host_memory.retain_freed_memory("system") is False
    jnp.zeros(1).block_until_ready()  # this process's backend is up: too late to change the allocator
    with caplog.at_level(logging.WARNING, logger="llava_jax.host_memory"):
        assert host_memory.retain_freed_memory("retain") is False
    assert "already initialised" in caplog.text


def test_auto_follows_the_platform(tmp_path, monkeypatch):
    assert host_memory.cpu_backend_expected("cpu") and host_memory.cpu_backend_expected("cpu,tpu")
    assert not host_memory.cpu_backend_expected("tpu") and not host_memory.cpu_backend_expected("cuda,cpu")
    monkeypatch.setattr(host_memory, "_ACCELERATOR_NODES", (str(tmp_path / "accel*"),))
    assert host_memory.cpu_backend_expected("")  # no platform named, no accelerator device node
    (tmp_path / "accel0").touch()
    assert not host_memory.cpu_backend_expected("")
