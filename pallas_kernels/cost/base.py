"""Shared pieces of the cost model: `KernelCost` and the helpers every
family's counts use (see the package doc)."""

from __future__ import annotations

import dataclasses

from jax.experimental import pallas as pl

from pallas_kernels.common import cdiv, pad_head_dim

F32_BYTES = 4
I32_BYTES = 4


@dataclasses.dataclass(frozen=True)
class KernelCost:
  """Cost of one kernel launch.

  Attributes:
    flops: matmul-unit FLOPs (tensor cores / MXU).
    vector_flops: row-wise FLOPs (elementwise multiply + reduce on the vector
      units: stripe row dots, decode range dots).
    transcendentals: `exp` evaluations.
    bytes_accessed: HBM bytes read plus written.
    programs: grid programs launched (parallelism available).
    wave_hits: bytes of `bytes_accessed` that the *wave model* serves from
      L2 (0: not modelled). GPU kernels launched block-first
      (`pallas_kernels.common.block_first`) run neighbouring blocks of one
      (batch, head) together; a wave is `wave` programs launched together,
      and the model loads each distinct row a wave reads from HBM once, the
      rest of the wave's loads being L2 hits (`search_wave_rows`,
      `span_wave_key_blocks`, the block-sparse `wave_key_blocks`).
  """

  flops: int = 0
  vector_flops: int = 0
  transcendentals: int = 0
  bytes_accessed: int = 0
  programs: int = 0
  wave_hits: int = 0

  def __add__(self, other: "KernelCost") -> "KernelCost":
    return KernelCost(*(int(a) + int(b) for a, b in zip(dataclasses.astuple(self),
                                                        dataclasses.astuple(other))))

  def estimate(self) -> pl.CostEstimate:
    """The `pl.CostEstimate` (all FLOPs together) for `pallas_call`."""
    return pl.CostEstimate(flops=int(self.flops + self.vector_flops),
                           transcendentals=int(self.transcendentals),
                           bytes_accessed=int(self.bytes_accessed))


def _out(cost: KernelCost, detail: bool):
  return cost if detail else cost.estimate()


def _cdiv(a, b) -> int:
  return cdiv(int(a), int(b))


def padded_head_dim(head_dim: int, platform: str = "gpu") -> int:
  """head_dim inside the kernels (`pallas_kernels.common.pad_head_dim`)."""
  return pad_head_dim(head_dim, platform)


def stripe_rows(block: int, platform: str = "gpu", unit: int = 16,
                misaligned_fraction: float | None = None) -> float:
  """Rows one stripe step loads: the block on GPU; on TPU one alignment
  `unit` more for stripes whose residue is not 0 (`(unit - 1) / unit` of
  them when residues are uniform)."""
  if platform != "tpu":
    return float(block)
  frac = (unit - 1) / unit if misaligned_fraction is None else misaligned_fraction
  return block + unit * frac


def _group(q_heads: int, kv_heads: int) -> int:
  if q_heads % kv_heads:
    raise ValueError(f"q_heads={q_heads} must be a multiple of kv_heads={kv_heads}.")
  return q_heads // kv_heads
