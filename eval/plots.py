"""Pictures for the docs: PPA masks, superlinear coverage, benchmark curves.

    python -m eval.plots [--out docs]

writes `ppa_masks.png` (the PPA mask for a few p) and `superlinear_spans.png`
(candidate coverage count and the spans one query selects). The benchmark
plot (`bench_ops.png`) is drawn by `plot_bench`, called from
`python -m eval.bench_ops`.
"""

from __future__ import annotations

import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import attn  # noqa: E402
from attn import masks  # noqa: E402


def plot_ppa_masks(path, *, seq_len=256, window=16, ps=(0.0, 0.5, 0.75, 1.0)):
  """The PPA mask (query rows, key columns) for each p, plus keys per query."""
  fig, axes = plt.subplots(1, len(ps) + 1, figsize=(4 * (len(ps) + 1), 4.4))
  for ax, p in zip(axes, ps):
    m = attn.ppa_mask(seq_len, p=p, window=window)
    ax.imshow(m, cmap="Greys", interpolation="nearest")
    ax.set_title(f"p = {p:g}: {int(m.sum())} keys\n"
                 f"({m.sum() / attn.causal_mask(seq_len).sum():.0%} of causal)")
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
  ax = axes[-1]
  for p in ps:
    m = attn.ppa_mask(seq_len, p=p, window=window)
    ax.plot(np.arange(seq_len), m.sum(axis=1), label=f"p = {p:g}")
  ax.set_yscale("log")
  ax.set_xlabel("query position i")
  ax.set_ylabel("kept keys")
  ax.set_title("kept keys per query (log scale)")
  ax.legend()
  fig.suptitle(f"PPA mask, L = {seq_len}, window = {window} (black = attended)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def coverage_count(seq_len, config):
  """int `[L, L]`: how many candidate spans (window counted once) hold each key."""
  f = masks.superlinear_stripe_table(seq_len, config)
  q = np.arange(seq_len)
  anchors = q[:, None] + 1 - f[None, :]
  start, end = masks.superlinear_spans(q[:, None], anchors, seq_len, config)
  diff = np.zeros((seq_len, seq_len + 1), np.int32)
  rows = np.broadcast_to(q[:, None], anchors.shape)
  ok = (anchors >= 0) & (end >= start)
  np.add.at(diff, (rows[ok], start[ok]), 1)
  np.add.at(diff, (rows[ok], end[ok] + 1), -1)
  count = np.cumsum(diff, axis=1)[:, :seq_len]
  d = q[:, None] - q[None, :]
  count = count + ((d >= 0) & (d < config.window))
  return count


def plot_superlinear(path, *, seq_len=512, config=None, query=None, seed=0):
  """Coverage count of the candidate spans and the spans one query selects."""
  import jax
  import jax.numpy as jnp

  config = config or attn.SuperlinearConfig()
  count = coverage_count(seq_len, config)
  causal = attn.causal_mask(seq_len)
  cand = attn.superlinear_candidate_mask(seq_len, config=config)
  fig, axes = plt.subplots(1, 2, figsize=(13, 5.4))
  ax = axes[0]
  shown = np.where(causal, count, np.nan)
  im = ax.imshow(shown, cmap="viridis", interpolation="nearest")
  fig.colorbar(im, ax=ax, fraction=0.046, label="candidate spans holding the key")
  ax.set_title(f"coverage count, L = {seq_len}: min over causal = "
               f"{int(count[causal].min())}\ncandidate mask == causal mask: "
               f"{bool(np.array_equal(cand, causal))}")
  ax.set_xlabel("key position")
  ax.set_ylabel("query position")

  # One query's stripes, selected anchors and spans on random inputs.
  query = seq_len - 1 if query is None else query
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  shape = (1, seq_len, 1, 32)
  q, k, v, qs = (jax.random.normal(kk, shape, jnp.float32) for kk in keys)
  res = attn.superlinear_attention_with_anchors(q, k, v, qs, config=config,
                                                implementation="xla")
  sel = np.asarray(res.anchors[0, query, 0])
  gates = np.asarray(res.gates[0, query, 0])
  f = masks.superlinear_stripe_table(seq_len, config)
  stripes = query + 1 - f
  stripes = stripes[stripes >= 0]
  scores = np.asarray(jnp.einsum("d,kd->k", qs[0, query, 0], k[0, :, 0]))
  ax = axes[1]
  ax.plot(np.arange(query + 1), scores[:query + 1], color="0.8", lw=0.8,
          label="<q_search, k_search[a]> for every key")
  ax.scatter(stripes, scores[stripes], s=14, color="C0", zorder=3,
             label=f"{stripes.size} candidate anchors (stripes)")
  start, end = masks.superlinear_spans(np.full(sel.shape, query), sel, seq_len, config)
  y0 = scores.min() - 0.5
  for n, (a, s0, e0, g) in enumerate(zip(sel, start, end, gates)):
    if a < 0:
      continue
    ax.axvspan(s0 - 0.5, e0 + 0.5, color=f"C{n + 1}", alpha=0.25,
               label=f"span {n + 1}: anchor {a}, keys [{s0}, {e0}], gate {g:.2f}")
    ax.scatter([a], [scores[a]], s=60, marker="*", color=f"C{n + 1}", zorder=4)
  ax.axvspan(query - config.window + 0.5, query + 0.5, color="k", alpha=0.15,
             label=f"window: keys [{query - config.window + 1}, {query}]")
  ax.set_ylim(bottom=y0)
  ax.set_xlabel("key position")
  ax.set_ylabel("search score")
  ax.set_title(f"query {query}: top-{config.num_spans} anchors and their spans")
  ax.legend(fontsize=7, loc="lower left")
  fig.suptitle(f"superlinear attention, {config}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_bench(data, analysis, path, order):
  """Log-log time vs L (forward, forward+backward) and peak memory, per op;
  `order`: op names in legend order (ops without a cell are left out)."""
  cells = data["cells"]
  names = [name for name in order if any(c["op"] == name for c in cells.values())]
  fig, axes = plt.subplots(1, 3, figsize=(19, 6))
  styles = ["-o", "-s", "-^", "-v", "-D", "-<", "->", "-p", "-h", "-*", "-x"]
  for i, name in enumerate(names):
    for ax, mode, key in ((axes[0], "fwd", "time_s"), (axes[1], "fwdbwd", "time_s"),
                          (axes[2], "fwdbwd", "mem_bytes")):
      pts = sorted((c["L"], c[key]) for c in cells.values()
                   if c["op"] == name and c["mode"] == mode and c["status"] == "ok"
                   and c.get(key))
      if not pts:
        continue
      label = name
      if key == "time_s":
        e = analysis["exponents"][name][mode]
        label = f"{name} (slope {e:.2f})" if e is not None else name
      ax.plot(*zip(*pts), styles[i % len(styles)], label=label, ms=4,
              color=f"C{i % 10}")
  titles = ("forward time", "forward + backward time",
            "peak temporary memory, forward + backward")
  for ax, title, unit in zip(axes, titles, ("s", "s", "bytes")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length L")
    ax.set_ylabel(unit)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  mi = data["meta"]["machine"]
  fig.suptitle(f"attention ops, batch 1, 4 heads, head_dim 64, float32 - {mi['cpu']}, "
               f"{mi['cores']} cores, jax {mi['jax']} (slopes: least squares, L >= 2K)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m eval.plots")
  ap.add_argument("--out", default="docs")
  args = ap.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  plot_ppa_masks(os.path.join(args.out, "ppa_masks.png"))
  plot_superlinear(os.path.join(args.out, "superlinear_spans.png"))
  print(f"wrote {args.out}/ppa_masks.png, {args.out}/superlinear_spans.png")


if __name__ == "__main__":
  main()
