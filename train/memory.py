"""Compiled per-device memory of a config's train step, without running it.

    python -m train.memory --config configs/<name>.py [--set key=value]...

builds the `train.loop.Trainer` of the config (mesh, shardings, context
parallelism) with abstract state (nothing is allocated or initialised),
lowers and compiles one train step for the current backend and prints the
compiled program's `memory_analysis()`: per device, the bytes of the
arguments (params, optimizer state, batch), the outputs and the temporaries
(activations saved for the backward pass, gathered keys, workspaces). To
check a multi-device mesh on one machine without accelerators, force CPU
devices: `XLA_FLAGS=--xla_force_host_platform_device_count=8
JAX_PLATFORMS=cpu`. CPU compiles are no accelerator's: XLA's GPU/TPU
compilers fuse and schedule differently, so the numbers are a guide to how
memory scales (with the sequence shards, with seq_len), not a promise.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp

MIB = 2**20


def abstract_inputs(trainer) -> tuple:
  """`(state, rest, batch)` of `trainer.step_fn` as sharded ShapeDtypeStructs."""
  config = trainer.config
  rest = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      jax.eval_shape(trainer.init_rest), trainer.rest_shardings)
  shape = (config.batch_size, config.seq_len)
  tokens = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=trainer.batch_sharding)
  return trainer.abstract_state, rest, {"inputs": tokens, "targets": tokens}


def step_memory(config) -> dict:
  """Per-device bytes of `config`'s compiled train step (see the module
  docstring) and the layout it was compiled for."""
  from train import loop
  trainer = loop.Trainer(config)
  compiled = trainer.step_fn.lower(*abstract_inputs(trainer)).compile()
  stats = compiled.memory_analysis()
  mesh = {k: int(v) for k, v in trainer.mesh.shape.items()}
  n_seq = mesh.get(trainer.seq_axis, 1) if trainer.seq_axis else 1
  n_batch = mesh["data"] * mesh["fsdp"]
  params = sum(x.size for x in jax.tree.leaves(trainer.abstract_state["params"]))
  return {
      "backend": jax.default_backend(), "mesh": mesh, "seq_axis": trainer.seq_axis,
      "seq_len": config.seq_len, "batch_size": config.batch_size,
      "tokens_per_device": config.batch_size * config.seq_len // (n_batch * n_seq),
      "params": int(params),
      "argument_MiB": stats.argument_size_in_bytes / MIB,
      "output_MiB": stats.output_size_in_bytes / MIB,
      "alias_MiB": stats.alias_size_in_bytes / MIB,
      "temp_MiB": stats.temp_size_in_bytes / MIB,
      "generated_code_MiB": stats.generated_code_size_in_bytes / MIB,
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m train.memory", description=__doc__.split(
      "\n\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="KEY=VALUE")
  args = parser.parse_args(argv)
  from train.config import ConfigError, apply_overrides, load_config
  try:
    config = apply_overrides(load_config(args.config), args.overrides)
    out = step_memory(config)
  except (ConfigError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(out, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
