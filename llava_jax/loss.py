"""The training loss: next-token cross entropy on the supervised (assistant) tokens only.

Two savings over computing [B, T, V] logits everywhere, both exact:
- supervised positions first: in LLaVA data most positions (the image tokens, system text, user turns) are
  never supervised, so each row's supervised positions are gathered into a static budget of K positions and
  only those go through the vocabulary projection. If a row has more supervised tokens than K, the whole batch
  takes the full path instead (`lax.cond`), so nothing is ever dropped.
- chunked vocabulary: the projection + log-softmax runs over chunks of positions under `jax.checkpoint`, so at
  most [B, chunk, V] logits exist at a time, in the forward and the backward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llava_jax.models import layers as L

IGNORE_INDEX = -100


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@jax.custom_vjp
def nll_sum(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Sum over positions of -log softmax(logits)[target]: logits [..., V] float32, targets [...] int
    (IGNORE_INDEX positions count 0). Returns a scalar.

    The same value as logsumexp minus the target's logit, with a hand-written gradient: softmax minus the
    one-hot target in one element-wise pass over the logits (autodiff of the gather and the logsumexp
    writes a zero-filled [..., V] buffer, scatters into it and adds further [..., V] passes).
    """
    return _nll_sum_fwd(logits, targets)[0]


def _is_target(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """bool [..., V]: the one-hot target, by an iota compare (fuses into the passes over the logits)."""
    return jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == targets[..., None]


def _nll_sum_fwd(logits: jax.Array, targets: jax.Array):
    m = jnp.max(logits, axis=-1, keepdims=True)
    logz = jnp.log(jnp.sum(jnp.exp(logits - m), axis=-1)) + m[..., 0]
    valid = targets != IGNORE_INDEX
    # a gather of one logit per position (never differentiated: the gradient is hand-written below)
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    loss = jnp.sum(jnp.where(valid, logz - picked, 0.0))
    return loss, (logits, logz, targets)


def _nll_sum_bwd(res, g: jax.Array):
    logits, logz, targets = res
    scale = jnp.where(targets != IGNORE_INDEX, g, 0.0)[..., None]
    return (jnp.exp(logits - logz[..., None]) - _is_target(logits, targets)) * scale, None


nll_sum.defvjp(_nll_sum_fwd, _nll_sum_bwd)


def _ce_sum(hidden: jax.Array, targets: jax.Array, head: jax.Array, chunk: int) -> jax.Array:
    """Sum of cross entropies: hidden [B, N, D], targets [B, N] (IGNORE_INDEX = skip), head [D, V]."""
    b, n, d = hidden.shape

    def piece(h, t):
        return nll_sum(L.dense(h, head).astype(jnp.float32), t)

    if not chunk or chunk >= n:
        return piece(hidden, targets)
    padded = _round_up(n, chunk)
    if padded != n:
        hidden = jnp.pad(hidden, ((0, 0), (0, padded - n), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, padded - n)), constant_values=IGNORE_INDEX)
    hs = jnp.moveaxis(hidden.reshape(b, padded // chunk, chunk, d), 1, 0)
    ts = jnp.moveaxis(targets.reshape(b, padded // chunk, chunk), 1, 0)
    body = jax.checkpoint(lambda acc, x: (acc + piece(*x), None))
    total, _ = jax.lax.scan(body, jnp.float32(0), (hs, ts))
    return total


def supervised_budget(seq_len: int, fraction: float | None, multiple: int = 64) -> int | None:
    """Static per-row position budget for `fraction` of the T - 1 predicted positions (None: no budget)."""
    if not fraction or fraction >= 1.0:
        return None
    k = min(_round_up(max(int(fraction * (seq_len - 1)), 1), multiple), seq_len - 1)
    return k if k < seq_len - 1 else None


def hidden_cross_entropy(hidden: jax.Array, labels: jax.Array, head: jax.Array, *, budget: int | None = None,
                         chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """Summed next-token loss from final hidden states.

    Args:
      hidden: [B, T, D] final-norm'd hidden states; position t predicts labels[:, t + 1].
      labels: [B, T] int32, IGNORE_INDEX where not supervised (unshifted, as in HF).
      head: [D, V] output projection.
      budget: static number K of positions per row to project when every row has <= K supervised tokens.
      chunk: positions per vocabulary chunk (0: all at once).
    Returns:
      (sum of token losses [], count of supervised tokens [] float32).
    """
    h, t = hidden[:, :-1], labels[:, 1:]
    valid = t != IGNORE_INDEX
    count = valid.sum().astype(jnp.float32)
    if budget is None or budget >= h.shape[1]:
        return _ce_sum(h, t, head, chunk), count

    def gathered():
        order = jnp.argsort(~valid, axis=1, stable=True)[:, :budget]  # supervised positions first, in order
        hg = jnp.take_along_axis(h, order[..., None], axis=1)
        tg = jnp.take_along_axis(t, order, axis=1)
        tg = jnp.where(jnp.take_along_axis(valid, order, axis=1), tg, IGNORE_INDEX)
        return _ce_sum(hg, tg, head, chunk)

    def full():
        # Rare fallback. Under jax.checkpoint its residuals are its inputs: otherwise differentiating the cond
        # writes zeros for this branch's [B, T, V] logits on every step in which it is not taken.
        return jax.checkpoint(_ce_sum, static_argnums=(3,))(h, t, head, chunk)

    fits = jnp.max(valid.sum(axis=1)) <= budget
    return jax.lax.cond(fits, gathered, full), count


def llava_loss(model, batch: dict[str, jax.Array], *, budget_fraction: float | None = 0.5,
               chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """(summed loss, supervised count) of a LLaVA model on a batch dict with input_ids, labels,
    attention_mask [B, T], pixel_values [B, H, W, 3] and has_image [B] (and optionally `lora_key`, the PRNG
    key of the LoRA adapters' dropout). Packed batches (`data.packing`) add segment_ids and positions [B, T]
    and carry image slots (pixel_values [B, M, H, W, 3], has_image [B, M]); their labels hold IGNORE_INDEX at
    each sample's first token, so no sample predicts the next one's first token and the sum and count are
    those of the same samples unpacked."""
    extra = {"lora_key": batch["lora_key"]} if batch.get("lora_key") is not None else {}
    if batch.get("segment_ids") is not None:
        extra["segment_ids"] = batch["segment_ids"]
    hidden, _ = model(batch["input_ids"], batch.get("pixel_values"), batch.get("has_image"),
                      batch.get("attention_mask"), positions=batch.get("positions"), return_hidden=True, **extra)
    budget = supervised_budget(batch["input_ids"].shape[1], budget_fraction)
    return hidden_cross_entropy(hidden, batch["labels"], model.language_model.head_kernel(), budget=budget,
                                chunk=chunk)
