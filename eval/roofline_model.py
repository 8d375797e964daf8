"""Roofline model of the attention ops on an H100 (a model, not a measurement).

This module is the per-op model; `eval/roofline.py` (`python -m
eval.roofline`) the target cells, verdicts and the markdown section.

Sums, per op and shape, the kernels the op launches (`pallas_kernels.cost`)
plus the XLA glue around them (layout copies, frames, gathers), with the
table sizes taken from the public builders (`attn.BlockLayout`,
`attn.masks` stripe / span / PPA tables, `attn.SuperlinearConfig`). A
kernel's time is `max(bytes / HBM bandwidth, matmul FLOPs / peak + row-wise
FLOPs / vector peak)`, divided by the share of the SMs its grid can fill
(`min(1, programs / SMs)`); an op's time is the sum of its kernels'.
Transcendentals, caches, latency and launch overhead are left out, for ours
and the baselines alike. `kernel_time(reuse=...)` adds two cache views:
the *wave model* (`"wave"`: kernels launched block-first re-read rows their
wave of `Hardware.wave` concurrent programs already loaded, served from L2;
`cost.KernelCost.wave_hits`) and the optimistic bound (`"all"`: every Pallas
load at L2 bandwidth).

Baselines: dense causal flash attention (cuDNN) at `4 B Hq L^2 D / 2`
forward FLOPs reading q, k, v and writing o once; dense decode reading the
whole cache once with the device full.

`Changes` switches on the planned kernel changes of issue 15 one at a time
(or all together); every default is today's code.
"""

from __future__ import annotations

import dataclasses

import numpy as np

import attn
from attn import masks, ppa_routing
from attn.pallas import superlinear as pallas_superlinear
from pallas_kernels import cost
from pallas_kernels.block_sparse.common import diag_width
from pallas_kernels.block_sparse.gpu import splits_for
from pallas_kernels.decode import common as dec_common
from pallas_kernels.span import common as span_common
from pallas_kernels.span import ops as span_ops
from pallas_kernels.stripe import ops as stripe_ops

@dataclasses.dataclass(frozen=True)
class Hardware:
  name: str = "H100 SXM"
  peak_flops: float = 989e12      # dense bf16 tensor-core FLOP/s
  vector_flops: float = 67e12     # float32 non-tensor FLOP/s (row-wise dots)
  hbm_bw: float = 3.35e12         # bytes/s
  num_sms: int = 132
  l2_bw: float = 5.5e12           # bytes/s, an assumption (reuse models only)
  wave: int = 132                 # programs launched together (one per SM), wave model


H100 = Hardware()


@dataclasses.dataclass(frozen=True)
class Shape:
  batch: int = 1
  q_heads: int = 32
  kv_heads: int = 8
  head_dim: int = 128
  itemsize: int = 2               # bf16
  platform: str = "gpu"

  @property
  def group(self) -> int:
    return self.q_heads // self.kv_heads

  def kw(self):
    return dict(batch=self.batch, q_heads=self.q_heads, kv_heads=self.kv_heads,
                head_dim=self.head_dim, itemsize=self.itemsize, platform=self.platform)


@dataclasses.dataclass(frozen=True)
class Changes:
  """Planned kernel changes (issue 15); the defaults are today's kernels."""

  gqa_shared_reads: bool = True   # 2 (done): stripe search / PPA fwd, dq serve a kv head's
                                  #    G query heads (False: one program per query head)
  split_decode: bool = False      # 4: decode split over >= SMs programs, 1 row per stripe,
                                  #    dense decode reads only attended keys
  ppa_routing: bool = True        # 3 (done): PPA query blocks whose stripes would load more
                                  #    rows go to PPA-masked block-sparse tiles
                                  #    (`attn.ppa_routing`; False: stripes everywhere)

  def label(self) -> str:
    diff = [(f.name if getattr(self, f.name) else f"no {f.name}")
            for f in dataclasses.fields(self) if getattr(self, f.name) != f.default]
    return "today" if not diff else " + ".join(diff)


ALL = Changes(True, True, True)
SCENARIOS = (Changes(), Changes(gqa_shared_reads=False), Changes(ppa_routing=False), ALL)
RELEASED = attn.SuperlinearConfig(sw_index=65, num_spans=3, search_power=0.55,
                                  span_power=0.55, backward_factor=3.0, forward_factor=1.0)
CONFIGS = {"default": attn.SuperlinearConfig(), "released": RELEASED}


XLA = 1 << 20   # `programs` of XLA work (glue, baselines): the device is full
SEARCH = "stripe_search"   # the span-search kernel's part in `superlinear`


REUSE = ("none", "wave", "all")


def kernel_time(c: cost.KernelCost, hw: Hardware = H100, reuse: str = "none") -> float:
  """Roofline seconds of one kernel (see the module docstring).

  `reuse`: how the model serves a Pallas kernel's loads (XLA work always
  at HBM bandwidth):
    * `"none"`: every load from HBM (no cache);
    * `"wave"`: the wave model (`cost.KernelCost.wave_hits`): the loads a
      block-first kernel's wave repeats are L2 hits, so HBM carries the
      rest and L2 bandwidth bounds all of them; kernels without a wave
      model stay at HBM;
    * `"all"`: the optimistic bound, every load at L2 bandwidth.
  """
  if reuse not in REUSE:
    raise ValueError(f"reuse={reuse!r}: one of {REUSE}.")
  occ = min(1.0, c.programs / hw.num_sms) if c.programs else 1.0
  compute = c.flops / hw.peak_flops + c.vector_flops / hw.vector_flops
  pallas = c.programs < XLA
  if reuse == "all" and pallas:
    memory = c.bytes_accessed / hw.l2_bw
  elif reuse == "wave" and pallas and c.wave_hits:
    memory = max((c.bytes_accessed - c.wave_hits) / hw.hbm_bw, c.bytes_accessed / hw.l2_bw)
  else:
    memory = c.bytes_accessed / hw.hbm_bw
  return max(memory, compute) / occ


@dataclasses.dataclass(frozen=True)
class OpCost:
  parts: tuple   # ((name, KernelCost), ...)

  @property
  def total(self) -> cost.KernelCost:
    out = cost.KernelCost()
    for _, c in self.parts:
      out = out + c
    return out

  def time(self, hw: Hardware = H100, reuse: str = "none") -> float:
    return sum(kernel_time(c, hw, reuse) for _, c in self.parts)


def _glue(nbytes) -> cost.KernelCost:
  """XLA copies (transposes, pads, gathers): bandwidth only, device full."""
  return cost.KernelCost(bytes_accessed=int(nbytes), programs=XLA)


# ------------------------------------------------------------------ baselines


def dense_cudnn(seq_len: int, shape: Shape, backward: bool = False) -> OpCost:
  """Flash-attention causal: `4 B Hq L^2 D / 2` FLOPs, q, k, v, o once."""
  s = shape
  fl = 4 * s.batch * s.q_heads * seq_len ** 2 * s.head_dim // 2
  q = s.batch * seq_len * s.q_heads * s.head_dim * s.itemsize
  kv = s.batch * seq_len * s.kv_heads * s.head_dim * s.itemsize
  parts = [("flash fwd", cost.KernelCost(flops=fl, bytes_accessed=2 * q + 2 * kv,
                                         programs=XLA))]
  if backward:
    parts.append(("flash bwd", cost.KernelCost(flops=int(2.5 * fl),
                                               bytes_accessed=4 * q + 4 * kv,
                                               programs=XLA)))
  return OpCost(tuple(parts))


def dense_decode_baseline(cache_len: int, shape: Shape) -> OpCost:
  """One token against the whole cache, read once, device full (split-K)."""
  s = shape
  kv = 2 * s.batch * cache_len * s.kv_heads * s.head_dim * s.itemsize
  fl = 4 * s.batch * s.q_heads * cache_len * s.head_dim
  return OpCost((("dense decode", cost.KernelCost(flops=fl, bytes_accessed=kv,
                                                  programs=XLA)),))


# ------------------------------------------------------------- block-sparse


def wave_key_blocks(layout: attn.BlockLayout, wave: int) -> int:
  """Distinct key blocks per (batch, query head) that the block-sparse
  forward's waves read, summed over waves: the GPU launches the query blocks
  first, heaviest (last) first, `wave` of them together (the wave model)."""
  n, blocks = layout.num_kv_blocks, layout.kv_blocks
  cols = np.arange(blocks.shape[1])[None, :]
  order = np.arange(layout.num_q_blocks)[::-1]
  total = 0
  for w in range(0, order.size, wave):
    rows = order[w:w + wave]
    total += np.unique(blocks[rows][cols < n[rows][:, None]]).size
  return total


def block_sparse(layout: attn.BlockLayout, shape: Shape, backward: bool = False,
                 changes: Changes = Changes(), hw: Hardware = H100) -> OpCost:
  """The block-sparse kernels over `layout` (tiles = its non-empty tiles)."""
  s = shape
  kw = dict(s.kw(), tiles=layout.num_active_blocks, block_q=layout.block_q,
            block_k=layout.block_k)
  lq, lk = layout.q_len, layout.kv_len
  q_b = s.batch * lq * s.q_heads * s.head_dim * s.itemsize
  kv_b = s.batch * lk * s.kv_heads * s.head_dim * s.itemsize
  # q in and o out, heads-first (K and V are read in place when L is whole blocks).
  parts = [("layout copies", _glue(2 * (2 * q_b))),
           ("block_sparse_fwd", cost.block_sparse_fwd(
               num_q_blocks=layout.num_q_blocks, detail=True,
               wave_key_blocks=wave_key_blocks(layout, hw.wave), **kw))]
  if backward:
    parts += [("block_sparse_dq", cost.block_sparse_dq(num_q_blocks=layout.num_q_blocks,
                                                       detail=True, **kw)),
              ("block_sparse_dkv", cost.block_sparse_dkv(
                  num_k_blocks=layout.num_k_blocks, detail=True,
                  **{k: v for k, v in kw.items()})),
              ("bwd copies", _glue(2 * (3 * q_b + 4 * kv_b)))]
  return OpCost(tuple(parts))


def dense_pallas(seq_len, shape, backward=False, changes=Changes(), hw=H100):
  return block_sparse(attn.BlockLayout.causal(seq_len), shape, backward, changes, hw)


def window_pallas(seq_len, window, shape, backward=False, changes=Changes(), hw=H100):
  return block_sparse(attn.BlockLayout.sliding_window(seq_len, window=window), shape,
                      backward, changes, hw)


def sparse_layout(seq_len: int, density: float = 0.1, block: int = 128, seed: int = 0,
                  full: bool = False) -> attn.BlockLayout:
  """The benchmark's random layout (`density` of all tiles, one per row at
  least) or every tile."""
  n = -(-seq_len // block)
  if full:
    mask = np.ones((n, n), bool)
  else:
    rng = np.random.default_rng(seed)
    mask = rng.random((n, n)) < density
    mask[np.arange(n), rng.integers(0, n, n)] = True
  return attn.BlockLayout.from_block_mask(mask, seq_len, seq_len, block_q=block,
                                          block_k=block)


# --------------------------------------------------------------- superlinear


def span_lengths(seq_len: int, config: attn.SuperlinearConfig) -> np.ndarray:
  """Upper bound of a span's keys per query position (`back + fwd + 1`,
  at most the `t - W` keys before the window)."""
  table = masks.superlinear_span_table(seq_len, config).astype(np.int64)
  t = np.arange(1, seq_len + 1)
  return np.clip(table[t, 0] + table[t, 1] + 1, 0, np.maximum(t - config.window, 0))


def span_key_blocks(seq_len: int, config: attn.SuperlinearConfig, group: int,
                    block_q: int = 64, block_k: int = 64) -> tuple[int, int]:
  """`(rows, key blocks)` of the span call per (batch, row head): `L g K`
  pairs (`group` = g query heads per row head), the span lengths an upper
  bound per position (`span_lengths`)."""
  rows = seq_len * group * config.num_spans
  keys = group * config.num_spans * int(span_lengths(seq_len, config).sum())
  return rows, cost.span_key_blocks(rows, keys, seq_len, block_q, block_k)


def span_chunks(seq_len: int) -> int:
  """Steps of span attention's scan over the query axis
  (`attn.pallas.superlinear.QUERY_CHUNK` queries each above `SCAN_ABOVE`;
  1 = no scan)."""
  if seq_len <= pallas_superlinear.SCAN_ABOVE:
    return 1
  return -(-seq_len // pallas_superlinear.QUERY_CHUNK)


def superlinear(seq_len: int, config: attn.SuperlinearConfig, shape: Shape,
                backward: bool = False, changes: Changes = Changes(),
                hw: Hardware = H100) -> OpCost:
  """`superlinear_attention(implementation="pallas")` at `L` queries = keys."""
  s = shape
  sk = dict(s.kw(), gqa_shared_reads=changes.gqa_shared_reads)
  stripes = masks.superlinear_num_stripes(seq_len, config)
  num = config.num_spans
  # The kernel's own query rows per head (GPU: 64 rows in all, `64 // G` a
  # head); one program per query head (no GQA sharing) had 64 a head.
  search_bq = (stripe_ops.search_block_q(s.platform, seq_len, s.group)
               if changes.gqa_shared_reads else 64)
  deltas = 1 - masks.superlinear_stripe_table(seq_len, config).astype(np.int64)
  visits = cost.stripe_visits(deltas, q_blocks=-(-seq_len // search_bq), block_q=search_bq,
                              kv_len=seq_len)
  wave_rows = cost.search_wave_rows(deltas, q_len=seq_len, block_q=search_bq,
                                    kv_len=seq_len, wave=hw.wave)
  dp = cost.padded_head_dim(s.head_dim, s.platform)
  q_rows = s.batch * s.q_heads * seq_len
  frame = 2 * s.batch * s.kv_heads * seq_len * dp * s.itemsize + 2 * q_rows * dp * s.itemsize
  parts = [("search frames", _glue(frame)),
           (SEARCH, cost.stripe_search(q_len=seq_len, stripes=stripes,
                                                num_spans=num, block_q=search_bq,
                                                visits=visits, wave_rows=wave_rows,
                                                detail=True, **sk))]
  # Gate logits: the search's own scores (search once), no forward kernel.
  # Span kernels: rows in row heads of `g` query heads of one kv head's group
  # (`span.common.row_heads`); forward / dq grids over (batch, row head),
  # dk / dv over (batch, kv head).
  hv = span_common.row_heads(s.q_heads, s.kv_heads)
  g = s.q_heads // hv
  heads = s.batch * hv
  dtype = {2: "bfloat16", 4: "float32"}[s.itemsize]
  # The span kernels' own tiles: the forward's (256 pair rows on GPU for
  # 16-bit inputs) and the backward's (`span.ops.default_blocks`).
  fq, fk = span_ops.default_blocks(s.platform, forward=True, dtype=dtype)
  bq, bk = span_ops.default_blocks(s.platform, forward=False, dtype=dtype)
  w_fwd = heads * cost.window_key_blocks(seq_len, config.window, g, fq, fk)
  w_bwd = heads * cost.window_key_blocks(seq_len, config.window, g, bq, bk)
  rows, sp_fwd = span_key_blocks(seq_len, config, g, fq, fk)
  _, sp_bwd = span_key_blocks(seq_len, config, g, bq, bk)
  sp_fwd, sp_bwd = sp_fwd * heads, sp_bwd * heads
  hk = dict(batch=s.batch, heads=hv, head_dim=s.head_dim, itemsize=s.itemsize,
            platform=s.platform)
  fwd_kw = dict(hk, block_q=fq, block_k=fk)
  bwd_kw = dict(hk, block_q=bq, block_k=bk, kv_heads=s.kv_heads)
  pairs = s.batch * hv * rows
  kv_b = s.batch * seq_len * s.kv_heads * s.head_dim * s.itemsize
  # The pairs' query rows: TPU gathers them into a [pairs, D] copy before its
  # kernels (written, read back); the GPU kernels gather them by index.
  q_pairs = 0 if s.platform == "gpu" else 2 * pairs * dp * s.itemsize
  span_glue = (4 * kv_b + 2 * q_rows * s.head_dim * s.itemsize      # kt, vt, qr
               + q_pairs
               + pairs * dp * s.itemsize                               # merge-and-gate reads o
               + pairs * 4 * 6)                                        # bounds, sort, inverse
  wave = dict(block_q=fq, block_k=fk, wave=hw.wave)
  w_wave = heads * cost.span_wave_key_blocks(seq_len * g, seq_len, config.window, **wave)
  sp_wave = heads * cost.span_wave_key_blocks(
      rows, seq_len, int(span_lengths(seq_len, config).max()),
      rows_per_key=g * num, **wave)
  parts += [("span window fwd", cost.span_fwd(rows=seq_len * g, key_blocks=w_fwd,
                                              wave_key_blocks=w_wave, detail=True,
                                              **fwd_kw)),
            ("span spans fwd", cost.span_fwd(rows=rows, key_blocks=sp_fwd,
                                             wave_key_blocks=sp_wave, detail=True,
                                             **fwd_kw)),
            ("span glue", _glue(span_glue))]
  if backward:
    parts += [("span window bwd", cost.span_bwd(rows=seq_len * g, kv_len=seq_len,
                                                key_blocks=w_bwd, detail=True, **bwd_kw)),
              ("span spans bwd", cost.span_bwd(rows=rows, kv_len=seq_len, key_blocks=sp_bwd,
                                               detail=True, **bwd_kw)),
              ("span bwd glue", _glue(2 * span_glue)),
              # Span attention scans over chunks of `QUERY_CHUNK` queries
              # past that length: every chunk after the first writes full
              # dk / dv partials from both calls (4 kv_b), which are read back
              # (4 kv_b) and added into float32 sums (read + write, 8 kv_b).
              ("span chunk sums", _glue(16 * kv_b * (span_chunks(seq_len) - 1))),
              ("gate_logits_bwd", cost.gate_logits_bwd(
                  q_len=seq_len, num_spans=num, detail=True, **s.kw()))]
  return OpCost(tuple(parts))


# ----------------------------------------------------------------------- PPA


def _ppa_stripes(q_len: int, kv_len: int, offsets: np.ndarray, shape: Shape,
                 changes: Changes, block: int) -> cost.KernelCost:
  """The stripe kernels' forward on the last `q_len` of `kv_len` positions:
  a program loops over the far offsets of `offsets` (cut at `kv_len - 1`)
  that reach a key of its block (`cost.ppa_stripe_visits`)."""
  s = shape
  runs, far = masks.ppa_dense_runs(offsets)
  runs = [(lo, min(hi, kv_len - 1)) for lo, hi in runs if lo < kv_len]
  far = far[far < kv_len]
  # The GQA-folded kernel's tile holds `G` heads: `block / G` rows per head
  # (at least 16), as `stripe.ops._head_block_q` picks on GPU.
  bq = max(16, block // s.group) if changes.gqa_shared_reads else block
  band = sum(cost.band_chunks(q_len, kv_len, kv_len - q_len, lo, hi, block, bq)
             for lo, hi in runs)
  visits = cost.ppa_stripe_visits(far, q_len=q_len, kv_len=kv_len,
                                  q_offset=kv_len - q_len, block=bq)
  return cost.ppa_fwd(q_len=q_len, band_tiles=band, far_offsets=far.size, detail=True,
                      gqa_shared_reads=changes.gqa_shared_reads, visits=visits,
                      **dict(s.kw(), block_q=bq, block_k=block))


def _mask_tiles(layout: attn.BlockLayout) -> int:
  """Mask tiles the kernels read: a table layout's listed tiles with a mask
  (id >= 2); none for a band layout (masked from positions)."""
  if layout.band is not None:
    return 0
  listed = np.arange(layout.max_kv_blocks)[None, :] < layout.num_kv_blocks[:, None]
  return int((layout.mask_ids[listed] >= 2).sum())


def ppa(seq_len: int, p: float, window: int, shape: Shape,
        changes: Changes = Changes(), block: int = 64) -> OpCost:
  """`ppa_attention(implementation="pallas")` prefill forward at `L` queries = keys.

  `ppa_routing` (today's code, `attn.pallas.ppa.routed_prefill`): the
  routing of `attn.ppa_routing.ppa_routing` at its default blocks; the
  routed query blocks are one block-sparse call over their PPA mask's
  non-empty tiles plus, per masked tile and query head, its int32
  diagonal mask row (`diag_width(block_q, block_k)` lanes: a PPA tile mask
  depends only on `i - j`; table layouts); the other
  blocks one stripe call (`block`-row
  key tiles) over the far offsets up to the last query. Without it, one
  stripe call over every query block and far offset.
  """
  s = shape
  offsets = masks.ppa_offsets(seq_len - 1, p=p, window=min(window, seq_len))
  if not changes.ppa_routing:
    return OpCost((("ppa_fwd", _ppa_stripes(seq_len, seq_len, offsets, s, changes, block)),))
  rb = ppa_routing.default_block(seq_len)
  plan = ppa_routing.ppa_routing(seq_len, seq_len, p=p, window=window, block_q=rb,
                                 block_k=rb, group=s.group, head_dim=s.head_dim,
                                 itemsize=s.itemsize)
  parts = []
  for r0, r1, routed in plan.segments():
    if routed:
      layout = ppa_routing.ppa_layout(r1 - r0, r1, q_offset=r0, p=p, window=window,
                                      block_q=rb, block_k=rb)
      mask_bytes = s.batch * s.q_heads * _mask_tiles(layout) * diag_width(rb, rb) * 4
      parts.append(("block-sparse (routed, diagonal mask rows)", cost.block_sparse_fwd(
          num_q_blocks=layout.num_q_blocks, tiles=layout.num_active_blocks, block_q=rb,
          block_k=rb, detail=True, **s.kw()) + cost.KernelCost(bytes_accessed=mask_bytes)))
    else:
      parts.append(("ppa_fwd (stripes)", _ppa_stripes(r1 - r0, r1, offsets, s, changes, block)))
  return OpCost(tuple(parts))


# -------------------------------------------------------------------- decode


def superlinear_decode(cache_len: int, config: attn.SuperlinearConfig, shape: Shape,
                       changes: Changes = Changes()) -> OpCost:
  """One token at the end of a `cache_len` cache (Pallas decode kernels).

  As the kernels run them: the stripe walk cut into the splits of
  `decode.common.stripe_splits` (one gathered row per stripe), the band
  into those of `band_splits`, each span into `range_splits` parts
  (`changes` does not change decode any more: item 4 is in).
  """
  del changes
  s = shape
  f = masks.superlinear_stripe_table(cache_len, config).astype(np.int64)
  stripes = int((f <= cache_len).sum())       # first_stripe: f(j) <= q_offset + lq
  programs = s.batch * s.kv_heads
  splits = dec_common.stripe_splits(f.size, programs=programs)
  band_splits = dec_common.band_splits(config.window, lq=1, programs=programs)
  lens = span_lengths(cache_len, config)[-1]
  range_programs = s.batch * s.kv_heads * s.group * config.num_spans
  spans = masks.superlinear_span_table(cache_len, config).astype(np.int64)
  range_splits = dec_common.range_splits(int(spans.sum(axis=1).max()) + 1,
                                         programs=range_programs)
  range_tiles = (s.batch * s.q_heads * config.num_spans * range_splits
                 * -(-int(lens) // (range_splits * cost.DECODE_TILE)))
  return OpCost((
      ("decode_search", cost.decode_search(q_len=1, stripes=stripes, num_spans=config.num_spans,
                                           num_splits=splits, detail=True, **s.kw())),
      ("decode_ranges", cost.decode_ranges(q_len=1, num_spans=config.num_spans,
                                           range_tiles=range_tiles, num_splits=range_splits,
                                           detail=True, **s.kw())),
      ("decode_band", cost.decode_band(q_len=1, width=config.window, num_splits=band_splits,
                                       detail=True, **s.kw()))))


def dense_decode_pallas(cache_len: int, shape: Shape, changes: Changes = Changes()) -> OpCost:
  """Ours: `dense_attention(implementation="pallas")` with a traced offset.

  Today: the band kernel with a traced key limit (no zeroing pass over the
  cache; key blocks past the query are skipped); the `G` query heads of a
  kv head folded into one block's rows (`Spec.fold`: the keys read once per
  kv head) and each row's key blocks split over enough programs to fill
  the SMs (`pallas_kernels.block_sparse.gpu.num_splits`); K and V read in
  their `[B, L, Hk, D]` layout (no copy of the cache). Planned: as the
  baseline (the same bytes; the split's merge and the q/o copies are what
  differs).
  """
  if changes.split_decode:
    return dense_decode_baseline(cache_len, shape)
  layout = attn.BlockLayout.causal(1, kv_len=cache_len, block_q=16, block_k=128)
  parts = []
  for name, c in block_sparse(layout, dataclasses.replace(shape, q_heads=shape.kv_heads)).parts:
    if name == "block_sparse_fwd":
      c = dataclasses.replace(c, programs=c.programs * splits_for(c.programs,
                                                                  layout.num_k_blocks))
    parts.append((name, c))
  return OpCost(tuple(parts))
