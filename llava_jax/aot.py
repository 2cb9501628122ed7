"""Ahead-of-time compile of the real train step for a TPU topology, on a CPU host (needs libtpu:
`pip install -e .[tpu]`).

    python -m llava_jax.aot --config=configs/finetune.py:7b --topology=v5p-8 \
        [--config.mesh.fsdp=-1 --config.model.remat=full --config.grad_accum_steps=4] [--estimate_mfu] \
        [--json=OUT.json]

Builds the model abstractly (no weights are allocated) from the config's `model.arch` preset, shards it
on a mesh over the topology's devices with the config's rules, lowers and compiles the same jitted step
the trainer runs, and prints per-chip memory (arguments, outputs, temporaries, total against the chip's
HBM) and XLA's flop count with an estimated step time (flops / peak, and bytes / HBM bandwidth).
`--estimate_mfu` adds XLA's own roofline estimate of the step and the MFU it implies (`estimate_mfu`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Any

# Compile-only use of libtpu: several compiles (or other jax processes) may load it at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from llava_jax import checkpoint as ckpt  # noqa: E402
from llava_jax import cli, metrics, sharding, train_config  # noqa: E402
from llava_jax import train as T  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice: jax topology arguments plus per-chip HBM (GiB), peak bf16 TFLOP/s and HBM GB/s."""

    name: str  # jax topology name, e.g. "v5:2x2x1"
    chip_config: str  # "megacore" | "default"
    chips_per_host_bounds: tuple[int, int, int]
    hbm_gib: float
    peak_tflops: float
    hbm_gbps: float


# Public per-chip figures (Cloud TPU documentation): v5p 95 GiB / 459 TF / 2765 GB/s,
# v5e 16 GiB / 197 TF / 819 GB/s, v4 32 GiB / 275 TF / 1228 GB/s, v6e 32 GiB / 918 TF / 1640 GB/s.
TOPOLOGIES: dict[str, Topology] = {
    "v4-8": Topology("v4:2x2x1", "megacore", (2, 2, 1), 32.0, 275.0, 1228.0),
    "v4-16": Topology("v4:2x2x2", "megacore", (2, 2, 1), 32.0, 275.0, 1228.0),
    "v4-32": Topology("v4:2x2x4", "megacore", (2, 2, 1), 32.0, 275.0, 1228.0),
    "v5p-8": Topology("v5:2x2x1", "megacore", (2, 2, 1), 95.0, 459.0, 2765.0),
    "v5p-16": Topology("v5:2x2x2", "megacore", (2, 2, 1), 95.0, 459.0, 2765.0),
    "v5p-32": Topology("v5:2x2x4", "megacore", (2, 2, 1), 95.0, 459.0, 2765.0),
    "v5p-64": Topology("v5:2x4x4", "megacore", (2, 2, 1), 95.0, 459.0, 2765.0),
    "v5p-128": Topology("v5:4x4x4", "megacore", (2, 2, 1), 95.0, 459.0, 2765.0),
    "v5e-1": Topology("v5e:1x1", "default", (1, 1, 1), 16.0, 197.0, 819.0),
    "v5e-4": Topology("v5e:2x2", "default", (2, 2, 1), 16.0, 197.0, 819.0),
    "v5e-8": Topology("v5e:2x4", "default", (2, 2, 1), 16.0, 197.0, 819.0),
    "v5e-16": Topology("v5e:4x4", "default", (2, 2, 1), 16.0, 197.0, 819.0),
    "v5e-32": Topology("v5e:4x8", "default", (2, 2, 1), 16.0, 197.0, 819.0),
    "v6e-8": Topology("v6e:2x4", "default", (2, 2, 1), 32.0, 918.0, 1640.0),
}


class TopologyError(ValueError):
    """Unknown topology name, or libtpu is not installed."""


class EstimateError(RuntimeError):
    """XLA's cost analysis for this backend gives no roofline estimate (`optimal_seconds`)."""


def arch_config(arch: str) -> Any:
    """LlavaConfig of a preset: '7b' / '13b' (LLaVA-1.5: CLIP ViT-L/14-336 + Vicuna, mlp2x_gelu, layer -2),
    'tiny' (for tests)."""
    from llava_jax.models.clip import CLIPVisionConfig
    from llava_jax.models.llama import LlamaConfig
    from llava_jax.models.llava import LlavaConfig

    vit_l = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                             image_size=336, patch_size=14, projection_dim=768)
    if arch == "7b":
        text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
        vision = vit_l
    elif arch == "13b":
        text = LlamaConfig(vocab_size=32064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                           num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096)
        vision = vit_l
    elif arch == "tiny":
        text = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=8, projection_dim=32)
    else:
        raise train_config.ConfigError(f"unknown model.arch {arch!r}: 7b, 13b or tiny")
    return LlavaConfig(vision=vision, text=text, image_token_id=32000, projector="mlp2x_gelu",
                       vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=32001)


def topology_devices(name: str) -> tuple[list, Topology]:
    """The devices of a TPU topology description (compile-only; nothing runs)."""
    if name not in TOPOLOGIES:
        raise TopologyError(f"unknown topology {name!r}; known: {', '.join(TOPOLOGIES)}")
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise TopologyError("libtpu is not installed: pip install -e '.[tpu]'") from e
    from jax.experimental import topologies

    topo = TOPOLOGIES[name]
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.name, chip_config_name=topo.chip_config,
                                        chips_per_host_bounds=topo.chips_per_host_bounds, num_slices=1)
    return list(desc.devices), topo


def _abstract(state: nnx.State, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)


def compile_step(cfg: ml_collections.ConfigDict, devices: list, mcfg: Any = None,
                 unroll_layers: bool = False) -> tuple[Any, dict]:
    """Lowers and compiles the trainer's step for `devices`; returns (compiled, facts).

    mcfg: a LlavaConfig replacing the config's `model.arch` preset; unroll_layers: unroll both layer
    stacks (so that XLA's cost analysis sees every layer)."""
    from llava_jax.models.llava import Llava, set_scan_unroll
    from llava_jax.models.lora import lora_spec_of

    train_config.check_attention_impl(cfg)
    mcfg = mcfg or arch_config(cfg.model.arch)
    mesh = sharding.make_mesh(cfg.mesh, devices=devices)
    rules = sharding.rules_from_config(cfg.axis_rules)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = cfg.batch_size // max(cfg.grad_accum_steps, 1)
    if cfg.batch_size % max(cfg.grad_accum_steps, 1) or micro % shards:
        raise train_config.ConfigError(
            f"micro-batch {micro} (batch_size {cfg.batch_size} / grad_accum_steps {cfg.grad_accum_steps}) does not "
            f"divide over data x fsdp = {shards} chips: lower --config.grad_accum_steps or raise --config.batch_size")
    total_steps = max(cfg.max_steps, 1000)
    tx, _ = T.make_optimizer(cfg, total_steps)
    trainable = ckpt.trainable_filter(cfg.trainable)
    remat = None if cfg.model.remat == "none" else cfg.model.remat

    def build():
        model = Llava(mcfg, dtype=train_config.dtype_of(cfg.model.dtype),
                      param_dtype=train_config.dtype_of(cfg.model.param_dtype),
                      rngs=nnx.Rngs(0), attention_impl=cfg.model.attention_impl or None, remat=remat)
        T.prepare_lora(model, cfg, trainable)  # the config's LoRA adapters and frozen-base dtype, as the trainer
        return model, nnx.Optimizer(model, tx, wrt=trainable)

    model, optimizer = nnx.eval_shape(build)
    if unroll_layers:
        set_scan_unroll(model, True)
    parts = T.split_parts(model, optimizer, trainable)
    packed = bool(cfg.data.packing)
    batch_sh = T.batch_shardings_for(mesh, rules, packed=packed)
    lora_spec = lora_spec_of(model)
    step = T.make_step_fn(parts, accum=cfg.grad_accum_steps, batch_constraint=T.micro_batch_constraint(mesh, rules),
                          loss_budget=cfg.model.loss_budget or None, loss_chunk=cfg.model.loss_chunk,
                          dropout_seed=cfg.seed if lora_spec is not None and lora_spec.dropout > 0 else None)
    jitted, p_sh, o_sh = T.jit_step(step, parts, mesh, rules, batch_sh)
    f_sh = sharding.state_shardings(parts.frozen, mesh, rules)
    r_sh = sharding.state_shardings(parts.rest, mesh, rules)
    b, t, s = cfg.batch_size, cfg.data.max_length, mcfg.vision.image_size
    shapes = {"input_ids": ((b, t), jnp.int32), "labels": ((b, t), jnp.int32), "attention_mask": ((b, t), jnp.int32),
              "pixel_values": ((b, s, s, 3), jnp.float32), "has_image": ((b,), jnp.bool_)}
    m = T.images_per_row(cfg, mcfg.num_image_tokens)
    if packed:  # packed rows: segment ids, positions, M image slots per row
        shapes.update({"segment_ids": ((b, t), jnp.int32), "positions": ((b, t), jnp.int32),
                       "pixel_values": ((b, m, s, s, 3), jnp.float32), "has_image": ((b, m), jnp.int32)})
    batch = {k: jax.ShapeDtypeStruct(shape, dt, sharding=batch_sh[k]) for k, (shape, dt) in shapes.items()}
    trains = metrics.trained_parts(parts.params)
    t0 = time.time()
    with jax.set_mesh(mesh):
        lowered = jitted.lower(_abstract(parts.params, p_sh), _abstract(parts.opt_state, o_sh),
                               _abstract(parts.frozen, f_sh), _abstract(parts.rest, r_sh), batch)
    t1 = time.time()
    compiled = lowered.compile()
    t2 = time.time()
    facts = {
        "mesh": {n: int(mesh.shape[n]) for n in mesh.axis_names},
        "hosts": len({d.process_index for d in devices}),  # a multi-host slice compiles as one program
        "params_total": T.count_params(nnx.state(model, nnx.Param)),
        "params_trainable": T.count_params(parts.params),
        "model_flops": metrics.model_flops_per_step(mcfg, cfg.batch_size, cfg.data.max_length, trains,
                                                    images_per_row=m),
        "trains": trains,
        "lower_s": round(t1 - t0, 1),
        "compile_s": round(t2 - t1, 1),
    }
    return compiled, facts


def report(compiled: Any, facts: dict, topo: Topology, cfg: ml_collections.ConfigDict) -> dict:
    """Per-chip memory and cost figures of a compiled step (as a dict; also printed)."""
    gib = 1024**3
    mem = compiled.memory_analysis()
    args = mem.argument_size_in_bytes
    outs = mem.output_size_in_bytes
    alias = getattr(mem, "alias_size_in_bytes", 0)
    temps = mem.temp_size_in_bytes
    code = getattr(mem, "generated_code_size_in_bytes", 0)
    total = args + outs - alias + temps + code
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    flops = float(cost.get("flops", 0.0))
    bytes_accessed = float(cost.get("bytes accessed", 0.0))
    chips = math.prod(facts["mesh"].values())
    model_flops_chip = facts["model_flops"] / chips
    t_flops = model_flops_chip / (topo.peak_tflops * 1e12)
    t_bytes = bytes_accessed / (topo.hbm_gbps * 1e9)
    tokens = cfg.batch_size * cfg.data.max_length
    out = dict(facts)
    out.update({
        "per_chip_gib": {"arguments": args / gib, "outputs": outs / gib, "aliased": alias / gib,
                         "temporaries": temps / gib, "code": code / gib, "total": total / gib,
                         "hbm": topo.hbm_gib},
        "fits": total / gib <= topo.hbm_gib,
        "xla_flops_per_chip": flops,  # XLA counts a scanned layer's body once
        "model_flops_per_chip": model_flops_chip,
        "bytes_accessed_per_chip": bytes_accessed,
        "est_step_s_compute": t_flops,  # model FLOPs at 100% of peak: a lower bound
        "est_step_s_memory": t_bytes,
        "est_step_s": max(t_flops, t_bytes),
        "est_step_s_at_50pct_mfu": 2 * t_flops,
        "tokens_per_step": tokens,
    })
    return out


def estimate_mfu(cfg: ml_collections.ConfigDict, devices: list, topo: Topology,
                 depths: tuple[tuple[int, int], ...] = ((2, 2), (3, 2), (2, 3))) -> dict:
    """XLA's estimated step time and MFU for the config's full model, from compiles XLA can count in full.

    XLA's cost analysis counts a loop body once, so the scanned layer stacks and the accumulation loop
    hide nearly all the work from it. This compiles one micro-batch (batch_size / grad_accum_steps,
    accumulation 1) of the same model with both layer stacks unrolled at shallow depths
    (text layers, vision layers run), fits XLA's `optimal_seconds` (its roofline estimate of the
    program, per chip) as a + b * text_layers + c * vision_layers, and extrapolates to the real depths.
    The fit starts at 2 layers: going from 1 to 2 layers adds less than every later layer does (on the
    tiny preset 8.1 vs 11.3-11.5 us per layer), after which the estimate grows linearly with depth.
    The step estimate is grad_accum_steps x that (pessimistic: the optimizer update is counted once
    per micro-batch); MFU = model FLOPs per chip / (estimate x peak). Collectives are whatever XLA's
    estimate makes of them (it does not model their overlap with compute). With attention_impl 'flash_tpu'
    the kernel's backward FLOPs, which XLA does not see, are added at peak.
    """
    base = arch_config(cfg.model.arch)
    accum = cfg.grad_accum_steps
    micro = cfg.copy_and_resolve_references()
    with micro.unlocked():
        micro.batch_size = cfg.batch_size // accum
        micro.grad_accum_steps = 1
    vision_run_full = max(base.feature_layers)  # the tower runs up to its deepest feature layer
    run_offset = base.vision.num_hidden_layers - vision_run_full
    rows = []
    for text_layers, vision_run in depths:
        mcfg = dataclasses.replace(
            base, text=dataclasses.replace(base.text, num_hidden_layers=text_layers),
            vision=dataclasses.replace(base.vision, num_hidden_layers=vision_run + run_offset))
        compiled, facts = compile_step(micro, devices, mcfg=mcfg, unroll_layers=True)
        trains = facts["trains"]
        cost = compiled.cost_analysis()
        cost = (cost[0] if cost else {}) if isinstance(cost, list | tuple) else cost
        if "optimal_seconds" not in (cost or {}):
            raise EstimateError("XLA's cost analysis has no 'optimal_seconds' for this backend (TPU topologies "
                                "give it); no MFU estimate")
        rows.append({"text_layers": text_layers, "vision_layers_run": vision_run,
                     "optimal_seconds": float(cost["optimal_seconds"]), "flops": float(cost.get("flops", 0.0)),
                     "compile_s": facts["compile_s"]})
        print(f"  micro-batch, {text_layers} text / {vision_run} vision layers unrolled: XLA optimal "
              f"{rows[-1]['optimal_seconds'] * 1e3:.1f} ms, {rows[-1]['flops'] / 1e12:.2f} TFLOP per chip "
              f"(compile {facts['compile_s']}s)", flush=True)
    a = np.array([[1.0, r["text_layers"], r["vision_layers_run"]] for r in rows])
    coef, *_ = np.linalg.lstsq(a, np.array([r["optimal_seconds"] for r in rows]), rcond=None)
    chips = len(devices)
    # XLA's cost analysis has no cost for the Pallas flash kernel's backward pass (its forward carries one):
    # add those FLOPs at peak, per text layer: scores recomputed, dP, dV, dQ, dK = 5 [T, T] x H matmuls per
    # head, masked blocks included (so an overestimate of the work).
    uncounted_s = 0.0
    if (cfg.model.attention_impl or "") == "flash_tpu":
        t = base.text
        flops = micro.batch_size * t.num_attention_heads * 10 * cfg.data.max_length ** 2 * t.head_dim / chips
        uncounted_s = flops / (topo.peak_tflops * 1e12)
    micro_s = float(coef @ [1.0, base.text.num_hidden_layers, vision_run_full]) \
        + base.text.num_hidden_layers * uncounted_s
    model_flops_chip = metrics.model_flops_per_step(base, cfg.batch_size, cfg.data.max_length, trains,
                                                    images_per_row=T.images_per_row(cfg, base.num_image_tokens)) / chips
    step_s = accum * micro_s
    return {"fits_rows": rows, "per_layer_s": {"text": float(coef[1]) + uncounted_s, "vision": float(coef[2])},
            "uncounted_kernel_s_per_text_layer": uncounted_s,
            "micro_batch_s": micro_s, "est_step_s": step_s, "model_flops_per_chip": model_flops_chip,
            "est_mfu": model_flops_chip / (step_s * topo.peak_tflops * 1e12)}


def print_report(r: dict, topology: str, cfg: ml_collections.ConfigDict) -> None:
    m = r["per_chip_gib"]
    print(f"topology {topology}: {len(jax.tree.leaves(r['mesh']))} axes, {r.get('hosts', 1)} host(s); "
          f"mesh {r['mesh']}; {r['params_total'] / 1e9:.2f}B params, "
          f"{r['params_trainable'] / 1e9:.2f}B trainable; batch {cfg.batch_size} x {cfg.data.max_length} tokens, "
          f"grad accumulation {cfg.grad_accum_steps}, remat {cfg.model.remat}, compute {cfg.model.dtype}")
    print(f"per-chip memory (GiB): arguments {m['arguments']:.2f}, outputs {m['outputs']:.2f} "
          f"(aliased {m['aliased']:.2f}), temporaries {m['temporaries']:.2f}, total {m['total']:.2f} "
          f"of {m['hbm']:.0f} HBM -> {'fits' if r['fits'] else 'DOES NOT FIT'}")
    print(f"per chip: {r['model_flops_per_chip'] / 1e12:.1f} model TFLOP per step (XLA's count, scan bodies once: "
          f"{r['xla_flops_per_chip'] / 1e12:.1f} TFLOP, {r['bytes_accessed_per_chip'] / 1e9:.1f} GB accessed); "
          f"estimated step {r['est_step_s']:.2f}s at peak, {r['est_step_s_at_50pct_mfu']:.2f}s at 50% MFU; "
          f"lower {r['lower_s']}s, compile {r['compile_s']}s")


def main(argv: list[str]) -> None:
    from absl import flags

    cfg = flags.FLAGS.config
    if not cfg.model.arch:
        print("error: the config has no model.arch preset (7b, 13b, tiny)", file=sys.stderr)
        sys.exit(2)
    try:
        devices, topo = topology_devices(flags.FLAGS.topology)
        compiled, facts = compile_step(cfg, devices)
    except (TopologyError, train_config.ConfigError, sharding.MeshConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    r = report(compiled, facts, topo, cfg)
    r["topology"] = flags.FLAGS.topology
    print_report(r, flags.FLAGS.topology, cfg)
    if flags.FLAGS.estimate_mfu:
        print("estimating MFU from unrolled shallow compiles of one micro-batch:", flush=True)
        try:
            est = estimate_mfu(cfg, devices, topo)
        except EstimateError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        r["xla_estimate"] = est
        print(f"XLA's estimate: {est['per_layer_s']['text'] * 1e3:.1f} ms per text layer, "
              f"{est['per_layer_s']['vision'] * 1e3:.1f} ms per vision layer; micro-batch {est['micro_batch_s']:.2f}s, "
              f"step {est['est_step_s']:.2f}s -> estimated MFU {est['est_mfu']:.1%}")
    if flags.FLAGS.json:
        from llava_jax.io import atomic_write_json

        atomic_write_json(flags.FLAGS.json, r)


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "configs/finetune.py:7b", lock_config=True)
    flags.DEFINE_string("topology", "v5p-8", f"one of {', '.join(TOPOLOGIES)}")
    flags.DEFINE_string("json", "", "also write the figures to this JSON file")
    flags.DEFINE_bool("estimate_mfu", False, "also derive XLA's estimated MFU from three shallow unrolled compiles")
    flags.mark_flags_as_required(["config"])
    cli.absl_run(main)
