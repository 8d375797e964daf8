"""Pallas TPU (Mosaic) and GPU (Triton) kernels: not implemented yet.

The next milestone fills this package: block-sparse attention driven by
`attn.BlockLayout` (forward, dq and dkv kernels), a stripe kernel that serves
PPA's scores and superlinear's span-search, and span attention that never
drops a span. Until then `implementation="pallas"` in every `attn` op raises
`NotImplementedError` and `None` selects the `xla` path.
"""
