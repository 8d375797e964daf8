"""Compile cases: one public op call (forward or `jax.value_and_grad`) at one shape.

A `Case` is plain data (JSON-able, hashable) so that the driver can hand it
to a compile worker in another process. `build(case, sharding)` turns it into
a jitted function and `jax.ShapeDtypeStruct` arguments; nothing is allocated.
The kernels are reached only through the public `attn` ops with
`implementation="pallas"`.
"""

from __future__ import annotations

import dataclasses
import json

OPS = ("dense", "sliding", "bs_causal", "bs_sliding", "bs_doc", "bs_random", "ppa",
       "superlinear",
       "dense_decode", "sliding_decode", "ppa_decode", "superlinear_decode")
# The kernel family each op reaches (docs/kernels.md names them).
FAMILY = {"dense": "block_sparse", "sliding": "block_sparse", "bs_causal": "block_sparse",
          "bs_sliding": "block_sparse", "bs_doc": "block_sparse",
          "bs_random": "block_sparse", "ppa": "stripe",
          "superlinear": "stripe+span", "dense_decode": "block_sparse",
          "sliding_decode": "block_sparse", "ppa_decode": "decode",
          "superlinear_decode": "decode"}
SLIDING_WINDOW = 1024   # keys, for `sliding` and `bs_sliding`
DOC_LEN = 1024          # tokens per document of the `bs_doc` layout
RANDOM_DENSITY = 0.1    # fraction of the causal tiles kept by the `bs_random` layout
SEARCH_DIM = 64         # q_search / k_search feature size of the superlinear cases
RELEASED = dict(sw_index=65, num_spans=3, search_power=0.55, span_power=0.55,
                backward_factor=3.0, forward_factor=1.0)   # docs/superlinear.md


@dataclasses.dataclass(frozen=True)
class Case:
  """One compile: `op` at `seq_len` keys (decode: `q_len` queries at the cache's end).

  mode: "fwd" (the op alone) or "grad" (`jax.value_and_grad` of a weighted
    sum of the output wrt q, k, v and, for superlinear, q_search, k_search).
  heads: (num_q_heads, num_kv_heads).
  p: PPA exponent (ppa ops). config: "default" or "released" (superlinear ops).
  remat: superlinear prefill only: `superlinear_attention(remat=True)` (span
    attention's query chunks recomputed in the backward; acts above 128K
    queries).
  """

  op: str
  mode: str = "fwd"
  head_dim: int = 128
  seq_len: int = 4096
  dtype: str = "bfloat16"
  heads: tuple[int, int] = (8, 2)
  p: float = 0.5
  config: str = "default"
  q_len: int | None = None      # decode ops only (default 16)
  remat: bool = False

  def __post_init__(self):
    if self.op not in OPS:
      raise ValueError(f"op={self.op!r}: must be one of {OPS}.")
    if self.mode not in ("fwd", "grad"):
      raise ValueError(f"mode={self.mode!r}: must be 'fwd' or 'grad'.")
    object.__setattr__(self, "heads", tuple(int(h) for h in self.heads))
    if self.op.endswith("_decode") and self.q_len is None:
      object.__setattr__(self, "q_len", 16)
    if self.remat and self.op != "superlinear":
      raise ValueError(f"remat=True: only the superlinear prefill has it, not op={self.op!r}.")

  @property
  def key(self) -> str:
    """A short unique name, e.g. `ppa(p=0.75)/grad/d128/L32768/bf16/8:2`."""
    op = self.op
    if op.startswith("ppa"):
      op += f"(p={self.p:g})"
    if op.startswith("superlinear"):
      op += f"({self.config}{',remat' if self.remat else ''})"
    if self.q_len is not None:
      op += f"[q{self.q_len}]"
    dt = {"bfloat16": "bf16", "float32": "f32"}.get(self.dtype, self.dtype)
    return (f"{op}/{self.mode}/d{self.head_dim}/L{self.seq_len}/{dt}/"
            f"{self.heads[0]}:{self.heads[1]}")

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "Case":
    return cls(**json.loads(text))


def _layout(case: Case):
  import numpy as np
  from attn import BlockLayout
  n = case.seq_len
  if case.op == "bs_causal":
    return BlockLayout.causal(n)
  if case.op == "bs_sliding":
    return BlockLayout.sliding_window(n, window=SLIDING_WINDOW)
  if case.op == "bs_random":
    # A 90%-sparse table layout with wide rows: the diagonal tile plus a fixed
    # pseudo-random 10% of the earlier tiles (`from_block_mask`, O(tiles)).
    nb = -(-n // 128)
    rng = np.random.default_rng(0)
    tiles = np.tril(rng.random((nb, nb)) < RANDOM_DENSITY) | np.eye(nb, dtype=bool)
    return BlockLayout.from_block_mask(tiles, n, n)
  # Causal documents of DOC_LEN tokens: a table layout (from_fn), built only
  # inside a one-document band so that its cost is O(L * DOC_LEN).
  band = BlockLayout.sliding_window(n, window=DOC_LEN)
  return BlockLayout.from_fn(lambda i, j: (i // DOC_LEN == j // DOC_LEN) & (j <= i),
                             n, n, within=band)


def _op_fn(case: Case):
  """Returns `(fn, num_array_args, q_offset)`: fn(*arrays) -> output array."""
  import attn
  impl = dict(implementation="pallas")
  op = case.op
  if op == "dense":
    return (lambda q, k, v: attn.dense_attention(q, k, v, **impl)), 3
  if op == "sliding":
    return (lambda q, k, v: attn.sliding_window_attention(
        q, k, v, window=SLIDING_WINDOW, **impl)), 3
  if op.startswith("bs_"):
    layout = _layout(case)
    return (lambda q, k, v: attn.block_sparse_attention(q, k, v, layout, **impl)), 3
  off = dict(q_offset=case.seq_len - case.q_len) if case.q_len is not None else {}
  if op == "dense_decode":
    return (lambda q, k, v: attn.dense_attention(q, k, v, **off, **impl)), 3
  if op == "sliding_decode":
    return (lambda q, k, v: attn.sliding_window_attention(
        q, k, v, window=SLIDING_WINDOW, **off, **impl)), 3
  if op.startswith("ppa"):
    return (lambda q, k, v: attn.ppa_attention(q, k, v, p=case.p, **off, **impl)), 3
  config = attn.SuperlinearConfig(**RELEASED) if case.config == "released" else \
      attn.SuperlinearConfig()
  return (lambda q, k, v, qs, ks: attn.superlinear_attention(
      q, k, v, qs, ks, config=config, remat=case.remat, **off, **impl)), 5


def build(case: Case, sharding):
  """`(jitted_fn, args)` for `case`, args `jax.ShapeDtypeStruct` on `sharding`.

  q: `[1, q_len, hq, head_dim]`, k, v: `[1, seq_len, hk, head_dim]`,
  q_search / k_search: `[1, *, h, SEARCH_DIM]`; grad cases also take the
  output weights `w` (like q) and return `(loss, grads)`.
  """
  import jax
  import jax.numpy as jnp
  dtype = jnp.dtype(case.dtype)
  hq, hk = case.heads
  lq = case.q_len or case.seq_len
  lk = case.seq_len

  def sds(*shape):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  fn, n = _op_fn(case)
  args = [sds(1, lq, hq, case.head_dim), sds(1, lk, hk, case.head_dim),
          sds(1, lk, hk, case.head_dim)]
  if n == 5:
    args += [sds(1, lq, hq, SEARCH_DIM), sds(1, lk, hk, SEARCH_DIM)]
  if case.mode == "fwd":
    return jax.jit(fn), args

  def loss(*a):
    *xs, w = a
    return jnp.sum(fn(*xs).astype(jnp.float32) * w.astype(jnp.float32))

  grad = jax.value_and_grad(loss, argnums=tuple(range(n)))
  return jax.jit(grad), args + [sds(1, lq, hq, case.head_dim)]


def ci_cases(target: str | None = None) -> list[Case]:
  """The CI subset: each kernel family forward and grad once, at small L.

  The same cases for every target, plus float32 on `target="gpu"` (the
  float32 Triton tiles are chosen separately: table-layout block-sparse and
  span kernels, forward and grad). The superlinear glue compiles slowly on
  TPU and its compile time grows with L (docs/compiled.md): L = 512 keeps the
  subset within CI's budget; the sweep covers 4K-1M.
  """
  ops = [Case("bs_causal"), Case("bs_doc", seq_len=2048), Case("ppa", seq_len=2048),
         Case("superlinear", seq_len=512), Case("ppa_decode", seq_len=4096, q_len=4)]
  if target == "gpu":
    ops += [Case("bs_doc", seq_len=2048, dtype="float32"),
            Case("superlinear", seq_len=512, dtype="float32")]
  return [dataclasses.replace(c, mode=m) for c in ops for m in ("fwd", "grad")]


_BASE_OPS = [Case("dense"), Case("sliding"), Case("bs_causal"), Case("bs_sliding"),
             Case("bs_doc"), Case("bs_random"), Case("ppa", p=0.5), Case("ppa", p=0.75),
             Case("superlinear", config="default"), Case("superlinear", config="released"),
             Case("dense_decode"), Case("sliding_decode"),
             Case("ppa_decode", p=0.5), Case("superlinear_decode", config="default"),
             Case("superlinear_decode", config="released")]
SWEEP_LENGTHS = (4096, 32768, 131072, 1 << 20)


def _supports_len(case: Case, n: int) -> bool:
  # Table layouts stop at 128K: the from_fn document layout is built on the
  # host in O(L * DOC_LEN), the random one holds (L / 128)^2 tiles.
  return not (case.op in ("bs_doc", "bs_random") and n > 131072)


def sweep_cases(lengths=SWEEP_LENGTHS) -> list[Case]:
  """The full matrix, one factor at a time around (d128, L=4K, bf16, GQA 8:2).

  Per op and mode: head_dim 64 / 80 / 128 / 256 at 4K; every L in `lengths`
  at head_dim 128; float32 at head_dim 64 and 128; GQA 32:8 and MHA 8:8; decode ops also at q_len 1.
  Cheap cases first (sorted by L, then forward before grad).
  """
  out = []
  for base in _BASE_OPS:
    for mode in ("fwd", "grad"):
      b = dataclasses.replace(base, mode=mode)
      variants = [dataclasses.replace(b, head_dim=d) for d in (64, 80, 128, 256)]
      variants += [dataclasses.replace(b, seq_len=n) for n in lengths
                   if n != b.seq_len and _supports_len(b, n)]
      variants += [dataclasses.replace(b, dtype="float32", head_dim=d) for d in (64, 128)]
      variants += [dataclasses.replace(b, heads=(32, 8)),
                   dataclasses.replace(b, heads=(8, 8))]
      if b.q_len is not None:
        variants.append(dataclasses.replace(b, q_len=1))
      out += variants
  seen, unique = set(), []
  for c in out:
    if c.key not in seen:
      seen.add(c.key)
      unique.append(c)
  return sorted(unique, key=lambda c: (c.seq_len, c.mode != "fwd"))
