"""Block-sparse flash attention (forward, dq, dkv) for TPU and GPU.

  * `common.py`: the shared block logic (static `Spec`, device tables, tile
    states and masks from positions, online-softmax and gradient tile math);
  * `tpu.py`: Mosaic kernels with scalar-prefetched tables;
  * `gpu.py`: Pallas Triton kernels with tables as ordinary inputs;
  * `ops.py`: padding, `jax.custom_vjp` and the platform dispatch.

Kernels take plain arrays, int32 tables and static ints; `attn` builds the
tables (`attn/pallas/block_sparse.py`). Design: docs/kernels.md.
"""

from pallas_kernels.block_sparse.gpu import GpuBlocks, PassBlocks, default_blocks
from pallas_kernels.block_sparse.ops import (
    HARDWARE_CHECKS,
    HostTables,
    band_attention,
    check_blocks,
    table_attention,
)

__all__ = ["GpuBlocks", "HARDWARE_CHECKS", "HostTables", "PassBlocks", "band_attention",
           "check_blocks", "default_blocks", "table_attention"]
