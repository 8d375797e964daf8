"""Passkey needle-in-a-haystack (NIAH): generator, small trainer, depth x length eval.

    python -m eval.niah [--steps N] [--out docs] [--variants V ...] [--seeds S ...]

trains one small `train.model.Transformer` per (variant, seed) on passkey
retrieval at `--train-len` tokens, evaluates exact-match accuracy over a
depth x length grid, and writes (all under `--out`):

- `niah.json`: settings and one entry per finished (variant, seed), rewritten
  atomically after each one; a rerun skips the entries already there, so an
  interruption loses at most the run in progress.
- `niah_<variant>.png`: Kamradt-style heatmap (depth % on y, length on x),
  mean accuracy over the seeds.
- `niah.md`: the report (settings, table, heatmaps, anchor analysis). The
  text between `<!-- reading -->` and `<!-- /reading -->` of an existing
  report is kept when the report is rewritten (hand-written analysis).

## Task format (`PasskeyTask`)

Token ids: `0` padding (never produced), `1` MARKER, `2` QUERY,
`3 .. 3 + num_filler - 1` filler, then `num_values` value tokens. A sequence
of length `L` is

    position:  0 ...  m       m+1     ...  L-2  L-1
    token:     f ...  MARKER  VALUE   f ... f   QUERY

with filler `f` drawn i.i.d. uniformly from the filler ids, the needle
`(MARKER, VALUE)` at marker position `m = round(depth * (L - 3))` (depth 0 =
first token, depth 1 = the value sits just before the QUERY), and the
target: the next token after QUERY is VALUE. Values and the marker never
occur in the haystack. Training samples the marker position uniformly over
`[0, L - 3]`; the loss is the cross entropy of the logits at the last
position (QUERY) only. Accuracy is exact match of the argmax over the full
vocabulary there; chance is `1 / num_values`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import sys
import time
from typing import NamedTuple

import numpy as np

__all__ = [
    "NiahBatch", "PasskeyTask", "VARIANTS", "evaluate_grid", "make_batch",
    "marker_positions", "model_config", "needle_anchor_hits", "plot_heatmap",
    "train_model",
]

# ----------------------------------------------------------------------------
# Task generator (pure numpy)


@dataclasses.dataclass(frozen=True)
class PasskeyTask:
  """Token layout of the passkey task (see the module docstring).

  Attributes:
    num_filler: number of distinct haystack (filler) tokens.
    num_values: number of distinct passkey values (chance = 1 / num_values).
  """

  num_filler: int = 32
  num_values: int = 16

  PAD = 0
  MARKER = 1
  QUERY = 2

  def __post_init__(self):
    for name in ("num_filler", "num_values"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"PasskeyTask.{name}={value!r}: must be an int >= 1.")

  @property
  def filler_ids(self) -> np.ndarray:
    """int32 `[num_filler]`: the haystack vocabulary."""
    return np.arange(3, 3 + self.num_filler, dtype=np.int32)

  @property
  def value_ids(self) -> np.ndarray:
    """int32 `[num_values]`: the passkey vocabulary (disjoint from the filler)."""
    start = 3 + self.num_filler
    return np.arange(start, start + self.num_values, dtype=np.int32)

  @property
  def vocab_size(self) -> int:
    return 3 + self.num_filler + self.num_values


class NiahBatch(NamedTuple):
  """One batch of passkey sequences.

  tokens: int32 `[batch, seq_len]`.
  targets: int32 `[batch]`, the value token (next token after the QUERY).
  marker_pos: int32 `[batch]`, position `m` of MARKER (VALUE is at `m + 1`).
  depths: float64 `[batch]`, `m / (seq_len - 3)`.
  """
  tokens: np.ndarray
  targets: np.ndarray
  marker_pos: np.ndarray
  depths: np.ndarray


def marker_positions(depths, seq_len: int) -> np.ndarray:
  """Depth fractions in [0, 1] -> int32 marker positions `round(depth * (L - 3))`.

  depths: float `[n]` (or scalar) -> int32 `[n]` (or scalar) in `[0, L - 3]`.
  """
  depths = np.asarray(depths, dtype=np.float64)
  if np.any((depths < 0) | (depths > 1)) or not np.all(np.isfinite(depths)):
    raise ValueError(f"depths must lie in [0, 1], got {depths}")
  return np.rint(depths * (seq_len - 3)).astype(np.int32)


def make_batch(rng: np.random.Generator, task: PasskeyTask, batch: int,
               seq_len: int, depths=None) -> NiahBatch:
  """Sample `batch` passkey sequences of length `seq_len` (>= 4).

  Args:
    rng: the only source of randomness (same state -> same batch).
    task: token layout.
    batch: number of sequences.
    seq_len: tokens per sequence, the final QUERY included.
    depths: None (marker position uniform over `[0, seq_len - 3]`), a float
      in [0, 1] for every sequence, or float `[batch]`.

  Returns:
    `NiahBatch` with tokens `[batch, seq_len]`, targets/marker_pos/depths
    `[batch]`.
  """
  if not isinstance(rng, np.random.Generator):
    raise TypeError("rng must be a numpy.random.Generator")
  if seq_len < 4:
    raise ValueError(f"seq_len={seq_len}: must be >= 4 (needle, one filler, query)")
  tokens = rng.choice(task.filler_ids, size=(batch, seq_len)).astype(np.int32)
  if depths is None:
    marker = rng.integers(0, seq_len - 2, size=batch).astype(np.int32)
  else:
    marker = np.broadcast_to(marker_positions(depths, seq_len), (batch,)).astype(np.int32)
  values = rng.choice(task.value_ids, size=batch).astype(np.int32)
  rows = np.arange(batch)
  tokens[rows, marker] = task.MARKER
  tokens[rows, marker + 1] = values
  tokens[:, -1] = task.QUERY
  return NiahBatch(tokens, values, marker, marker / (seq_len - 3))


# ----------------------------------------------------------------------------
# Model variants

# The superlinear layers' settings for the comparison: a 15-key window
# (sw_index=3, W = 4**2 - 1) so that most needles lie outside it, two spans,
# the balanced p = sigma = 1/2 with the coverage-minimal backward factor 2.
SUPERLINEAR_KW = dict(sw_index=3, num_spans=2, search_power=0.5, span_power=0.5,
                      backward_factor=2.0, forward_factor=1.0)

# name -> ModelConfig overrides (the window of "sliding" is the superlinear one).
VARIANTS = {
    "dense": dict(attention="dense"),
    "sliding": dict(attention="sliding"),
    "superlinear_k": dict(attention="superlinear", search_key="k"),
    "superlinear_acc": dict(attention="superlinear", search_key="accumulated"),
}


def model_config(variant: str, task: PasskeyTask, **overrides):
  """The small `ModelConfig` of a variant: 2 layers, d_model 64, 2 heads of 32."""
  from attn import SuperlinearConfig
  from train.model import ModelConfig

  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
  sl = SuperlinearConfig(**SUPERLINEAR_KW)
  kw = dict(vocab_size=task.vocab_size, d_model=64, num_layers=2, num_heads=2,
            num_kv_heads=2, head_dim=32, mlp_dim=256, superlinear=sl,
            window=sl.window)
  kw.update(VARIANTS[variant])
  kw.update(overrides)
  return ModelConfig(**kw)


# ----------------------------------------------------------------------------
# Training


def _eprint(*args):
  print(*args, file=sys.stderr, flush=True)


def _fmt_s(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  return f"{seconds // 60}m{seconds % 60:02d}s"


def train_model(config, task: PasskeyTask, *, steps: int, batch_size: int = 32,
                seq_len: int = 128, lr: float = 3e-3, weight_decay: float = 0.01,
                seed: int = 0, log_every: int = 25, progress=None):
  """Train a fresh `Transformer(config)` on passkey retrieval.

  AdamW (linear warmup over the first 10% of steps, max 20, then cosine decay
  to 0.1 lr), global-norm clipping at 1, one jitted NNX train step
  (split/merge, donated state). Loss: cross entropy at the last position only.

  Args:
    config: a `train.model.ModelConfig` (vocab_size >= task.vocab_size).
    task, steps, batch_size, seq_len, lr, weight_decay, seed: as named; the
      model is initialised with `nnx.Rngs(seed)` and data drawn from
      `np.random.default_rng([seed, 1])`.
    log_every: record (step, loss, acc) every this many steps.
    progress: optional `callback(step, loss, acc)` called at each record.

  Returns:
    `(model, history)`: the trained `Transformer` and a list of
    `[step, loss, train_accuracy]` (float) records.
  """
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from train.model import Transformer

  if config.vocab_size < task.vocab_size:
    raise ValueError("config.vocab_size is smaller than the task vocabulary")
  model = Transformer(config, rngs=nnx.Rngs(seed))
  warmup = max(1, min(20, steps // 10))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup_steps=warmup, decay_steps=max(steps, warmup + 1),
      end_value=0.1 * lr)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(schedule, weight_decay=weight_decay))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  @functools.partial(jax.jit, donate_argnums=0)
  def step_fn(state, tokens, targets):
    model, optimizer = nnx.merge(graphdef, state)

    def loss_fn(model):
      logits = model(tokens)[:, -1]                               # [b, vocab]
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
      acc = jnp.mean(jnp.argmax(logits, axis=-1) == targets)
      return jnp.mean(loss), acc

    (loss, acc), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss, acc

  rng = np.random.default_rng([seed, 1])
  history = []
  losses, accs = [], []
  for step in range(1, steps + 1):
    b = make_batch(rng, task, batch_size, seq_len)
    state, loss, acc = step_fn(state, jnp.asarray(b.tokens), jnp.asarray(b.targets))
    losses.append(loss)
    accs.append(acc)
    if step % log_every == 0 or step == steps:
      loss_v = float(np.mean(jax.device_get(losses)))
      acc_v = float(np.mean(jax.device_get(accs)))
      if not math.isfinite(loss_v):
        raise FloatingPointError(f"non-finite loss {loss_v} at step {step}")
      history.append([step, loss_v, acc_v])
      losses, accs = [], []
      if progress is not None:
        progress(step, loss_v, acc_v)
  model, _ = nnx.merge(graphdef, state)
  return model, history


# ----------------------------------------------------------------------------
# Evaluation


def _eval_rng(seed: int, seq_len: int, depth_index: int) -> np.random.Generator:
  """The fixed eval set of one grid cell (same for every variant)."""
  return np.random.default_rng([seed, 2, seq_len, depth_index])


def _batches(n: int, size: int):
  for start in range(0, n, size):
    yield slice(start, min(n, start + size))


def evaluate_grid(model, task: PasskeyTask, *, lengths, depths, samples: int = 32,
                  seed: int = 1234, tokens_per_batch: int = 16384) -> np.ndarray:
  """Exact-match accuracy of `model` over a depth x length grid.

  Args:
    model: a `Transformer` (`model(tokens) -> logits [batch, seq, vocab]`).
    task: token layout.
    lengths: int `[nl]` sequence lengths (each >= 4).
    depths: float `[nd]` needle depths in [0, 1].
    samples: sequences per cell (drawn from `_eval_rng(seed, L, depth_index)`,
      so every model sees the same eval set).
    seed: eval-set seed.
    tokens_per_batch: forward batch size is `max(1, tokens_per_batch // L)`.

  Returns:
    float64 `[nd, nl]` accuracies in [0, 1] (rows: depths, columns: lengths).
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx

  graphdef, params = nnx.split(model)

  @jax.jit
  def predict(params, tokens):
    return jnp.argmax(nnx.merge(graphdef, params)(tokens)[:, -1], axis=-1)

  grid = np.zeros((len(depths), len(lengths)))
  for li, seq_len in enumerate(lengths):
    cells = [make_batch(_eval_rng(seed, seq_len, di), task, samples, seq_len, depth)
             for di, depth in enumerate(depths)]
    tokens = np.concatenate([c.tokens for c in cells])
    targets = np.concatenate([c.targets for c in cells])
    preds = np.concatenate([
        np.asarray(predict(params, jnp.asarray(tokens[sl])))
        for sl in _batches(len(tokens), max(1, tokens_per_batch // seq_len))])
    grid[:, li] = (preds == targets).reshape(len(depths), samples).mean(axis=1)
  return grid


def needle_anchor_hits(model, task: PasskeyTask, *, lengths, samples: int = 64,
                       seed: int = 4321) -> dict:
  """How often the final QUERY's selected superlinear spans contain the needle.

  For each superlinear layer, the layer's input is recomputed with the
  model's own blocks, the attention query, key, routing query and search key
  are formed as `train.model.Attention` forms them, and
  `attn.superlinear_attention_with_anchors` is run for the last position
  only (`q_offset = L - 1`). A head "hits" when one of its selected anchors'
  spans `[start, end]` (`attn.masks.superlinear_spans`) contains the VALUE
  position `m + 1`. Needles are drawn uniformly over depth; those with the
  VALUE inside the window are counted separately (no span needed).

  Returns a dict: per length (str) and per layer (`"layer<i>"`):
    `n_outside`: needles outside the window; `any_head_any_span`,
    `any_head_top1`, `per_head_any_span` ([heads]): hit fractions over those;
    `chance_any_head_any_span`: the same fraction if each head picked
    `num_spans` valid anchors uniformly at random; `correct_given_hit`,
    `correct_given_miss`: answer accuracy split by `any_head_any_span`
    (None when a group is empty); `answer_accuracy`.
  """
  import jax
  import jax.numpy as jnp

  import attn
  from attn import masks
  from train.model import apply_rope, gated_linear_scan

  config = model.config
  sl = config.superlinear
  window = sl.window
  layers = [i for i, kind in enumerate(config.layer_types) if kind == "superlinear"]
  if not layers:
    raise ValueError("the model has no superlinear layer")

  def anchors_of(tokens):
    """tokens [b, L] -> ({layer: anchors [b, heads, K]}, preds [b])."""
    seq_len = tokens.shape[1]
    positions = jnp.arange(seq_len, dtype=jnp.int32)
    x = model._embed(tokens)
    out = {}
    for i, block in enumerate(model.blocks):
      if i in layers:
        a = block.attention
        xn = block.attn_norm(x)
        theta = config.rope_theta
        q = apply_rope(a._proj(xn, a.wq), positions, theta=theta)
        k_raw = a._proj(xn, a.wk)
        k = apply_rope(k_raw, positions, theta=theta)
        v = a._proj(xn, a.wv)
        q_search = apply_rope(a._proj(xn, a.wq_search), positions, theta=theta)
        k_search = None
        if config.search_key == "accumulated":
          gates = jax.nn.sigmoid(jnp.einsum("bsd,dh->bsh", xn.astype(jnp.float32),
                                            a.w_gate[...]) + a.b_gate[...])
          h = gated_linear_scan(gates, k_raw)
          k_search = apply_rope(h.astype(xn.dtype), positions, theta=theta)
        res = attn.superlinear_attention_with_anchors(
            q[:, -1:], k, v, q_search[:, -1:], k_search, config=sl,
            q_offset=seq_len - 1, implementation=config.attn_implementation)
        out[i] = res.anchors[:, 0]                                # [b, h, K]
      x, _ = block(x, positions)
    preds = jnp.argmax(model._logits(x)[:, -1], axis=-1)
    return out, preds

  anchors_fn = jax.jit(anchors_of)
  rng_chance = np.random.default_rng([seed, 3])
  result = {}
  for seq_len in lengths:
    b = make_batch(np.random.default_rng([seed, 4, seq_len]), task, samples, seq_len)
    anchors, preds = anchors_fn(jnp.asarray(b.tokens))
    preds = np.asarray(preds)
    correct = preds == b.targets
    value_pos = b.marker_pos + 1
    q_pos = seq_len - 1
    outside = value_pos <= q_pos - window                         # not in the window
    stripes = q_pos + 1 - masks.superlinear_stripe_table(seq_len, sl)
    valid = stripes[stripes >= 0]
    per_len = {"n_outside": int(outside.sum()),
               "answer_accuracy": float(correct.mean())}
    for i in layers:
      anc = np.asarray(anchors[i])                                # [b, h, K]
      start, end = masks.superlinear_spans(np.int64(q_pos), anc, seq_len, sl)
      vp = value_pos[:, None, None]
      inside = (start <= vp) & (vp <= end)                        # [b, h, K]
      any_span = inside.any(axis=-1)                              # [b, h]
      hit = any_span.any(axis=-1)                                 # [b]
      top1 = inside[..., 0].any(axis=-1)
      # Chance: each head picks num_spans valid anchors uniformly at random.
      n_pick = min(sl.num_spans, len(valid))
      rand = np.stack([np.stack([rng_chance.choice(valid, n_pick, replace=False)
                                 for _ in range(anc.shape[1])]) for _ in range(samples)])
      rs, re_ = masks.superlinear_spans(np.int64(q_pos), rand, seq_len, sl)
      rand_hit = ((rs <= vp) & (vp <= re_)).any(axis=(-1, -2))
      o = outside

      def frac(x, mask):
        return float(x[mask].mean()) if mask.any() else None

      per_len[f"layer{i}"] = {
          "any_head_any_span": frac(hit, o),
          "any_head_top1": frac(top1, o),
          "per_head_any_span": [frac(any_span[:, h], o) for h in range(anc.shape[1])],
          "chance_any_head_any_span": frac(rand_hit, o),
          "correct_given_hit": frac(correct, o & hit),
          "correct_given_miss": frac(correct, o & ~hit),
      }
    result[str(seq_len)] = per_len
  return result


# ----------------------------------------------------------------------------
# Plots and report


def plot_heatmap(grid, lengths, depths, path, *, title: str):
  """Kamradt-style heatmap: depth % on y (0 at top), length on x, accuracy colour."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.colors import LinearSegmentedColormap

  grid = np.asarray(grid, dtype=np.float64)
  cmap = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])
  fig, ax = plt.subplots(figsize=(1.3 * len(lengths) + 2.2, 0.36 * len(depths) + 1.6))
  im = ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
  ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
  ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}" for d in depths])
  for (r, c), value in np.ndenumerate(grid):
    ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7)
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("needle depth (%)")
  ax.set_title(title, fontsize=9)
  fig.colorbar(im, ax=ax, label="accuracy")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _atomic_json(obj, path):
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def _mean_grid(runs):
  return np.mean([np.asarray(r["grid"]) for r in runs], axis=0)


def _variant_runs(results):
  by_variant = {}
  for run in results["runs"].values():
    by_variant.setdefault(run["variant"], []).append(run)
  order = [v for v in VARIANTS if v in by_variant]
  return {v: sorted(by_variant[v], key=lambda r: r["seed"]) for v in order}


def _pct(x):
  return "n/a" if x is None else f"{100 * x:.0f}%"


_READING_OPEN, _READING_CLOSE = "<!-- reading -->", "<!-- /reading -->"
_AUTO_MARK = "(Written automatically from the numbers; replace with a reading.)"


def _auto_reading(results) -> str:
  s = results["settings"]
  lines = [_AUTO_MARK, ""]
  for v, runs in _variant_runs(results).items():
    g = _mean_grid(runs)
    train_len_col = s["lengths"].index(s["train_len"]) if s["train_len"] in s["lengths"] else 0
    lines.append(f"- `{v}`: {g[:, train_len_col].mean():.2f} at the training length, "
                 f"{g.mean():.2f} over the whole grid.")
  return "\n".join(lines)


def write_report(results, out: str):
  """Heatmaps `niah_<variant>.png` and `niah.md` from the results dict."""
  s = results["settings"]
  lengths, depths = s["lengths"], s["depths"]
  variants = _variant_runs(results)
  for v, runs in variants.items():
    g = _mean_grid(runs)
    seeds = ",".join(str(r["seed"]) for r in runs)
    plot_heatmap(g, lengths, depths, os.path.join(out, f"niah_{v}.png"),
                 title=f"{v}: passkey accuracy (train L={s['train_len']}, "
                       f"{s['steps']} steps, seeds {seeds})")

  md_path = os.path.join(out, "niah.md")
  reading = None
  if os.path.exists(md_path):
    text = open(md_path).read()
    if _READING_OPEN in text and _READING_CLOSE in text:
      reading = text.split(_READING_OPEN, 1)[1].split(_READING_CLOSE, 1)[0].strip()
  if not reading or reading.startswith(_AUTO_MARK):
    reading = _auto_reading(results)

  sl = s["superlinear"]
  L = []
  L.append("# Passkey needle-in-a-haystack: superlinear routing keys compared\n")
  L.append(f"Generated by `python -m eval.niah {s['command_args']}` "
           f"({results.get('updated', '')}); raw numbers in `niah.json`. "
           "Issue 3 asks whether superlinear layers should route with `k` "
           "itself (`search_key=\"k\"`, as the reference) or with an "
           "accumulated key (`search_key=\"accumulated\"`: a gated, decaying "
           "causal scan of the keys, `train.model.gated_linear_scan`).\n")
  L.append("## Setup\n")
  L.append(f"- Task (`eval.niah.PasskeyTask`): {s['task']['num_filler']} filler "
           f"tokens drawn i.i.d., the needle `MARKER VALUE` at depth d "
           f"(marker at `round(d (L - 3))`), a final `QUERY` whose next token "
           f"is the VALUE; {s['task']['num_values']} values never used in the "
           f"haystack (chance {1 / s['task']['num_values']:.3f}); loss only at "
           "the QUERY position; exact-match accuracy (argmax over the full "
           "vocabulary).")
  L.append(f"- Model: 2 layers, d_model 64, 2 heads of 32, SwiGLU 256, RoPE, "
           f"all layers of the variant's attention type.")
  L.append(f"- Training: {s['steps']} steps, batch {s['batch_size']}, "
           f"L = {s['train_len']} (needle depth uniform), AdamW lr {s['lr']} "
           "(warmup, cosine to 0.1x), weight decay 0.01, clip 1.0; "
           f"seeds {s['seeds']}.")
  L.append(f"- Superlinear: `SuperlinearConfig({', '.join(f'{k}={v}' for k, v in sl.items())})`"
           f", i.e. a {s['window']}-key window; `sliding` uses the same "
           f"{s['window']}-key window; `dense` is full causal attention.")
  L.append(f"- Eval: lengths {lengths} x depths "
           f"{[round(100 * d) for d in depths]}%, {s['samples']} sequences per "
           "cell, the same eval set for every model. Lengths above the "
           "training length test length generalisation.\n")

  L.append("## Accuracy per variant and length\n")
  L.append("Mean over depths (and over seeds; per-seed values in brackets). "
           "`beyond window` averages the cells whose needle lies outside the "
           f"{s['window']}-key window (all but the deepest ones).\n")
  head = "| variant | train s | " + " | ".join(f"L={n}" for n in lengths) + " | beyond window |"
  L.append(head)
  L.append("|" + "---|" * (len(lengths) + 3))
  for v, runs in variants.items():
    cells = []
    for li in range(len(lengths)):
      per_seed = [float(np.mean(np.asarray(r["grid"])[:, li])) for r in runs]
      extra = f" ({', '.join(f'{x:.2f}' for x in per_seed)})" if len(runs) > 1 else ""
      cells.append(f"{np.mean(per_seed):.2f}{extra}")
    g = _mean_grid(runs)
    far = []
    for li, n in enumerate(lengths):
      value_pos = marker_positions(np.asarray(depths), n) + 1
      far.extend(g[value_pos <= (n - 1) - s["window"], li].tolist())
    secs = np.mean([r["train_seconds"] for r in runs])
    L.append(f"| `{v}` | {secs:.0f} | " + " | ".join(cells) + f" | {np.mean(far):.2f} |")
  L.append("")
  L.append("Final training loss / accuracy (last logging window): " + "; ".join(
      f"`{v}` " + ", ".join(f"{r['history'][-1][1]:.3f} / {r['history'][-1][2]:.2f}"
                            for r in runs) for v, runs in variants.items()) + ".\n")

  L.append("## Heatmaps\n")
  for v in variants:
    L.append(f"![{v}](niah_{v}.png)\n")

  anchor_runs = [(k, r) for k, r in results["runs"].items() if r.get("anchors")]
  if anchor_runs:
    L.append("## Do the selected spans contain the needle?\n")
    L.append("For each trained superlinear model: the final QUERY's selected "
             "anchors (`attn.superlinear_attention_with_anchors` on each "
             "layer's input, recomputed from the trained weights), over "
             f"{s['anchor_samples']} needles per length uniform in depth; counted "
             "over the needles outside the window. `hit` = some head has a "
             "selected span containing the VALUE position; `top-1` = the "
             "best anchor's span does; `chance` = the hit rate if each head "
             "picked its spans uniformly among the valid anchors; accuracy "
             "split by hit/miss.\n")
    L.append("| run | L | layer | outside | hit | top-1 | chance | acc if hit | acc if miss |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for key, r in anchor_runs:
      for n, per_len in r["anchors"].items():
        for layer, st in per_len.items():
          if not layer.startswith("layer"):
            continue
          L.append(f"| `{key}` | {n} | {layer[5:]} | {per_len['n_outside']} | "
                   f"{_pct(st['any_head_any_span'])} | {_pct(st['any_head_top1'])} | "
                   f"{_pct(st['chance_any_head_any_span'])} | "
                   f"{_pct(st['correct_given_hit'])} | {_pct(st['correct_given_miss'])} |")
    L.append("")

  L.append("## Reading\n")
  L.append(_READING_OPEN)
  L.append(reading)
  L.append(_READING_CLOSE)
  L.append("")
  with open(md_path, "w") as f:
    f.write("\n".join(L))


# ----------------------------------------------------------------------------
# Command line


def _parse(argv):
  ap = argparse.ArgumentParser(prog="python -m eval.niah", description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--out", default="docs")
  ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
  ap.add_argument("--lengths", nargs="+", type=int, default=[128, 256, 512, 1024])
  ap.add_argument("--depths", type=int, default=11,
                  help="number of depths, evenly spaced over 0..100%%")
  ap.add_argument("--samples", type=int, default=32, help="eval sequences per cell")
  ap.add_argument("--train-len", type=int, default=128)
  ap.add_argument("--batch-size", type=int, default=32)
  ap.add_argument("--lr", type=float, default=3e-3)
  ap.add_argument("--anchor-samples", type=int, default=64,
                  help="needles per length for the anchor analysis (0 = skip)")
  ap.add_argument("--fresh", action="store_true",
                  help="ignore an existing niah.json instead of resuming it")
  ap.add_argument("--report-only", action="store_true",
                  help="only rewrite niah.md and the heatmaps from niah.json")
  return ap.parse_args(argv)


def main(argv=None):
  args = _parse(sys.argv[1:] if argv is None else argv)
  os.makedirs(args.out, exist_ok=True)
  json_path = os.path.join(args.out, "niah.json")
  task = PasskeyTask()
  depths = [i / (args.depths - 1) for i in range(args.depths)] if args.depths > 1 else [0.5]
  cfg0 = model_config("superlinear_k", task)
  settings = dict(
      steps=args.steps, seeds=args.seeds, lengths=args.lengths, depths=depths,
      samples=args.samples, train_len=args.train_len, batch_size=args.batch_size,
      lr=args.lr, anchor_samples=args.anchor_samples,
      task=dataclasses.asdict(task), superlinear=dict(SUPERLINEAR_KW),
      window=cfg0.superlinear.window,
      command_args=" ".join(sys.argv[1:] if argv is None else argv))

  results = None
  if os.path.exists(json_path) and not args.fresh:
    with open(json_path) as f:
      results = json.load(f)
    old = {k: v for k, v in results["settings"].items() if k != "command_args"}
    new = {k: v for k, v in settings.items() if k != "command_args"}
    if args.report_only:
      pass
    elif {k: old.get(k) for k in ("steps", "lengths", "depths", "samples", "train_len",
                                  "batch_size", "lr", "task", "superlinear")} != \
         {k: new[k] for k in ("steps", "lengths", "depths", "samples", "train_len",
                              "batch_size", "lr", "task", "superlinear")}:
      raise SystemExit(f"{json_path} holds results for other settings; pass --fresh "
                       "to overwrite it or --out elsewhere.")
    else:
      results["settings"]["seeds"] = sorted(set(old["seeds"]) | set(args.seeds))
      results["settings"]["command_args"] = settings["command_args"]
  if args.report_only:
    if results is None:
      raise SystemExit(f"no {json_path} to report from")
    write_report(results, args.out)
    return
  if results is None:
    results = {"settings": settings, "runs": {}}

  plan = [(v, s) for s in args.seeds for v in args.variants
          if f"{v}/seed{s}" not in results["runs"]]
  _eprint(f"[niah] {len(plan)} runs to do ({len(results['runs'])} already in {json_path})")
  t_start = time.time()
  run_seconds = []                              # measured wall time per run
  for n_done, (variant, seed) in enumerate(plan):
    key = f"{variant}/seed{seed}"
    config = model_config(variant, task)
    t0 = time.time()

    def progress(step, loss, acc, t0=t0, n_done=n_done, key=key):
      elapsed = time.time() - t0
      per_run = (np.mean(run_seconds) if run_seconds
                 else elapsed / step * args.steps * 1.3)
      left_this = elapsed / step * (args.steps - step)
      eta = left_this + per_run * (len(plan) - n_done - 1)
      _eprint(f"[niah] {key} step {step}/{args.steps} loss {loss:.3f} acc {acc:.2f} "
              f"| {elapsed / step:.2f} s/step | run {n_done + 1}/{len(plan)} "
              f"| elapsed {_fmt_s(time.time() - t_start)} ETA {_fmt_s(eta)}")

    model, history = train_model(config, task, steps=args.steps,
                                 batch_size=args.batch_size, seq_len=args.train_len,
                                 lr=args.lr, seed=seed, progress=progress)
    t_train = time.time() - t0
    _eprint(f"[niah] {key} trained in {_fmt_s(t_train)}; evaluating the grid")
    grid = evaluate_grid(model, task, lengths=args.lengths, depths=depths,
                         samples=args.samples)
    run = dict(variant=variant, seed=seed, steps=args.steps,
               train_seconds=t_train, eval_seconds=time.time() - t0 - t_train,
               history=history, grid=grid.tolist(),
               mean_per_length=grid.mean(axis=0).tolist())
    if (config.attention == "superlinear" and args.anchor_samples > 0
        and seed == min(args.seeds)):
      run["anchors"] = needle_anchor_hits(model, task, lengths=args.lengths,
                                          samples=args.anchor_samples)
    results["runs"][key] = run
    results["updated"] = datetime.datetime.now().isoformat(timespec="seconds")
    _atomic_json(results, json_path)
    write_report(results, args.out)
    run_seconds.append(time.time() - t0)
    _eprint(f"[niah] {key} done in {_fmt_s(run_seconds[-1])}: accuracy per length "
            + ", ".join(f"{n}: {a:.2f}" for n, a in zip(args.lengths, run["mean_per_length"])))
  write_report(results, args.out)
  _eprint(f"[niah] all done in {_fmt_s(time.time() - t_start)}; report {args.out}/niah.md")


if __name__ == "__main__":
  main()
