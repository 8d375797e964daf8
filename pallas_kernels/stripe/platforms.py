"""Thin TPU (Mosaic) and GPU (Pallas Triton) launchers for the stripe kernels.

Every stripe kernel body (`kernels.py`) is written once against a small
context object:

  * `ctx.scalar(ref, j)`: entry `j` of an int32 table;
  * `ctx.rows(name, start, n, u, g=None)`: rows `[start, start + n)` of the
    framed array `name` (`[B, H, rows, W]`) for this program's batch row and
    head (`g`: the query head within the group, for key-block kernels);
    `start - u` is a multiple of the alignment unit, `u` a Python int.

`tpu.launch_tpu` serves `rows` by a DMA of the aligned window that starts `u`
rows early (frames stay in HBM, `memory_space=ANY`; tables are scalar-
prefetched into SMEM) and a static slice of the VMEM buffer. `gpu.launch_gpu`
passes frames as whole per-head blocks and loads the exact rows with
`pltriton.load`; tables are ordinary int32 inputs.

Both take the same description of a kernel:
  grid: `(B, H, n)` (H = query heads for query-block kernels, kv heads for
    key-block kernels);
  tables: 1-D int32 arrays (power-of-two length);
  blocks: `(array [B, H', L, W], block_rows, kind)` read as the block
    `[block_rows, W]` at grid position `(b, head, i)`;
  frames: `{name: (array [B, H', rows, W], kind)}` read through `ctx.rows`;
  outs: `(ShapeDtypeStruct [B, H, L, W], block_rows)`, block `(b, h, i)`.
`kind` maps the grid's head index to the array's head: `"same"`, `"kv"`
(query head `h` reads kv head `h // group`) or `"group"` (kv head `h` reads
the `group` query heads `h * group + g`; frames only).
"""

from __future__ import annotations


def head_block(kind: str, group: int):
  """Grid head index -> block head index of an array of that `kind`."""
  return {"same": lambda h: h, "kv": lambda h: h // group}[kind]


def launcher(plat: str):
  """`tpu.launch_tpu` or `gpu.launch_gpu`."""
  if plat == "tpu":
    from pallas_kernels.stripe import tpu
    return tpu.launch_tpu
  from pallas_kernels.stripe import gpu
  return gpu.launch_gpu
