"""Do the superlinear layer's selected spans contain the needle? (span analysis)"""

from __future__ import annotations

import numpy as np

__all__ = ["coverage", "needle_anchor_hits", "random_anchors", "span_hits"]


def span_hits(q_pos, anchors, value_pos, seq_len: int, config) -> np.ndarray:
  """Does a selected span contain the needle's VALUE?

  Args:
    q_pos: int `[n]`, absolute positions of the queries.
    anchors: int `[batch, n, heads, K]` selected anchors (`< 0` = none).
    value_pos: int `[batch]`, the VALUE position.
    seq_len: the sequence length (span tables).
    config: the `attn.SuperlinearConfig`.

  Returns:
    bool `[batch, n, heads, K]`: span `k` of head `h` of query `i` contains it.
  """
  from attn import masks

  q = np.asarray(q_pos, np.int64)[None, :, None, None]
  start, end = masks.superlinear_spans(q, np.asarray(anchors, np.int64), seq_len, config)
  vp = np.asarray(value_pos)[:, None, None, None]
  return (start <= vp) & (vp <= end)


def random_anchors(rng, q_pos, heads: int, seq_len: int, config) -> np.ndarray:
  """int `[n, heads, K]`: `K = num_spans` valid stripe anchors per head and query,
  drawn uniformly without replacement (`-1` where fewer are valid)."""
  from attn import masks

  table = masks.superlinear_stripe_table(seq_len, config)
  out = np.full((len(q_pos), heads, config.num_spans), -1, np.int64)
  for i, q in enumerate(q_pos):
    valid = q + 1 - table
    valid = valid[valid >= 0]
    k = min(config.num_spans, len(valid))
    for h in range(heads):
      out[i, h, :k] = rng.choice(valid, k, replace=False)
  return out


def needle_anchor_hits(model, task, *, lengths, samples: int = 64,
                       seed: int = 4321, distractors: int = 0) -> dict:
  """How often the selected superlinear spans contain the needle.

  For each superlinear layer, the layer's input is recomputed with the
  model's own blocks, the attention query, key, routing query and search key
  come from the layer's own `attn.layers.Attention.project`, and
  `attn.superlinear_attention_with_anchors` gives the anchors of the last `W`
  positions (the final query and the rest of its window, `W` = the window).
  A head "hits" when one of its selected anchors' spans `[start, end]`
  (`attn.masks.superlinear_spans`) contains the VALUE position. Needles are
  drawn uniformly over depth from held-out text; those whose VALUE lies
  inside the final query's window are not counted (no span needed).

  Returns a dict: per length (str): `n_outside`, `answer_accuracy`, and per
  layer (`"layer<i>"`), fractions over the needles outside the window:
    `any_head_any_span` (the final query), `any_head_top1`,
    `per_head_any_span` ([heads]), `window_any` (some position of the final
    query's window has such a span), the matching chance rates
    `chance_any_head_any_span`, `chance_window_any` (every head of every
    position picking `num_spans` valid anchors uniformly at random), and
    `correct_given_hit` / `correct_given_miss` (answer accuracy split by
    `any_head_any_span`; None when a group is empty).
  """
  import jax
  import jax.numpy as jnp

  import attn
  config = model.config
  sl = config.superlinear
  window = max(1, sl.window)
  layers = [i for i, kind in enumerate(config.layer_types) if kind == "superlinear"]
  if not layers:
    raise ValueError("the model has no superlinear layer")

  def anchors_of(tokens):
    """tokens [b, L] -> ({layer: anchors [b, n, heads, K]}, preds [b])."""
    seq_len = tokens.shape[1]
    n = min(window, seq_len)
    positions = jnp.arange(seq_len, dtype=jnp.int32)
    x = model._embed(tokens)
    out = {}
    for i, block in enumerate(model.blocks):
      if i in layers:
        xn = block.attn_norm(x)
        q, k, v, q_search, k_search, _ = block.attention.project(xn, positions)
        res = attn.superlinear_attention_with_anchors(
            q[:, -n:], k, v, q_search[:, -n:], k_search, config=sl,
            q_offset=seq_len - n, implementation=config.attn_implementation)
        out[i] = res.anchors                                      # [b, n, h, K]
      x = block(x)
    preds = jnp.argmax(model._logits(x)[:, -1], axis=-1)
    return out, preds

  anchors_fn = jax.jit(anchors_of)
  rng_chance = np.random.default_rng([seed, 3])
  result = {}
  for seq_len in lengths:
    b = task.batch(np.random.default_rng([seed, 4, seq_len]), samples, seq_len,
                   split="heldout", distractors=distractors)
    anchors, preds = anchors_fn(jnp.asarray(b.tokens))
    correct = np.asarray(preds) == b.targets
    n = min(window, seq_len)
    q_pos = np.arange(seq_len - n, seq_len)
    outside = b.value_pos <= (seq_len - 1) - window
    per_len = {"n_outside": int(outside.sum()), "answer_accuracy": float(correct.mean())}
    o = outside

    def frac(x, mask):
      return float(x[mask].mean()) if mask.any() else None

    for i in layers:
      anc = np.asarray(anchors[i])                                # [b, n, h, K]
      inside = span_hits(q_pos, anc, b.value_pos, seq_len, sl)    # [b, n, h, K]
      final = inside[:, -1]                                       # [b, h, K]
      hit = final.any(axis=(-1, -2))
      rand = np.stack([random_anchors(rng_chance, q_pos, anc.shape[2], seq_len, sl)
                       for _ in range(samples)])                  # [b, n, h, K]
      rand_inside = span_hits(q_pos, rand, b.value_pos, seq_len, sl)
      per_len[f"layer{i}"] = {
          "any_head_any_span": frac(hit, o),
          "any_head_top1": frac(final[..., 0].any(axis=-1), o),
          "per_head_any_span": [frac(final[:, h].any(axis=-1), o)
                                for h in range(anc.shape[2])],
          "window_any": frac(inside.any(axis=(1, 2, 3)), o),
          "chance_any_head_any_span": frac(rand_inside[:, -1].any(axis=(-1, -2)), o),
          "chance_window_any": frac(rand_inside.any(axis=(1, 2, 3)), o),
          "correct_given_hit": frac(correct, o & hit),
          "correct_given_miss": frac(correct, o & ~hit),
      }
    result[str(seq_len)] = per_len
  return result

def coverage(seq_len: int, superlinear_kw: dict) -> dict:
  """Keys the final query of a `seq_len` sequence can reach at most: its
  window plus `num_spans` of its longest candidate spans."""
  from attn import SuperlinearConfig, masks

  sl = SuperlinearConfig(**superlinear_kw)
  q = seq_len - 1
  anchors = q + 1 - masks.superlinear_stripe_table(seq_len, sl)
  anchors = anchors[anchors >= 0]
  start, end = masks.superlinear_spans(np.int64(q), anchors, seq_len, sl)
  lengths = np.sort(np.maximum(end - start + 1, 0))[::-1]
  keys = int(min(seq_len, sl.window + lengths[:sl.num_spans].sum()))
  return {"keys": keys, "fraction": keys / seq_len}
