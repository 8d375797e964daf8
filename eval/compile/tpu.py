"""Deviceless TPU compiles with libtpu: one compile-only chip per generation."""

from __future__ import annotations

import re

KERNEL_TARGET = "tpu_custom_call"
ENV = {"JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
# generation -> (topology name, chip_config_name)
TOPOLOGIES = {"v5e": ("v5e:2x2", "default"), "v6e": ("v6e:2x2", "default"),
              "v5p": ("v5:2x2x1", "megacore"), "v4": ("v4:2x2x1", "megacore")}


def device(gen: str):
  """A compile-only chip of TPU generation `gen` (one of TOPOLOGIES)."""
  if gen not in TOPOLOGIES:
    raise ValueError(f"gen={gen!r}: must be one of {sorted(TOPOLOGIES)}.")
  from jax.experimental import topologies
  name, chip = TOPOLOGIES[gen]
  topo = topologies.get_topology_desc(name, "tpu", chip_config_name=chip,
                                      chips_per_host_bounds=(2, 2, 1), num_slices=1)
  return topo.devices[0]


def kernel_names(lowered_text: str) -> list[str]:
  """Mosaic kernel names in a lowered (StableHLO) module."""
  return re.findall(r'kernel_name = "([^"]+)"', lowered_text)


def libtpu_version() -> str:
  from importlib import metadata
  try:
    return metadata.version("libtpu")
  except metadata.PackageNotFoundError:
    return "missing"
