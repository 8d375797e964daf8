"""Run by tests/test_sharding.py in a subprocess with 8 forced CPU devices:
the same train step on a 1-device mesh and on (8,1,1), (2,2,2), (1,1,8).

Writes `<out>/<mesh>.npz` (loss, grads and the params after one AdamW step of
the jitted, sharded train step) and
`<out>/specs.json` (each parameter's PartitionSpec per mesh, and under
`refused` the error of the (1,1,8) mesh without `allow_replication`).
"""

import dataclasses
import json
import os
import sys

import jax
import numpy as np

from train import data as data_lib
from train import loop
from train import sharding as shd
from train.config import load_config

MESHES = {"1x1x1": (1, 1, 1), "8x1x1": (8, 1, 1), "2x2x2": (2, 2, 2), "1x1x8": (1, 1, 8)}


def main(out: str, layer_pattern: str):
  assert jax.device_count() == 8, jax.devices()
  base = load_config(os.path.join(os.path.dirname(__file__), "train_micro_config.py"))
  config = dataclasses.replace(
      base, batch_size=16, seq_len=32, grad_accum=2,
      model=dataclasses.replace(base.model, d_model=64, num_layers=len(layer_pattern.split(",")), num_heads=8,
                                num_kv_heads=2, head_dim=8, mlp_dim=128, window=8,
                                layer_pattern=tuple(layer_pattern.split(","))))
  tokens = next(data_lib.make_iterator(config))["tokens"]
  specs = {}
  init = None
  for name, shape in MESHES.items():
    devices = jax.devices()[:1] if shape == (1, 1, 1) else jax.devices()
    mesh = shd.make_mesh(shape, devices=devices)
    if shape == (1, 1, 8):  # 2 kv heads over 8 tensor shards: refused unless allowed
      try:
        loop.Trainer(config, mesh=mesh)
      except ValueError as e:
        specs["refused"] = str(e)
      config = dataclasses.replace(
          config, sharding=dataclasses.replace(config.sharding, allow_replication=("kv_heads",)))
    trainer = loop.Trainer(config, mesh=mesh)
    if init is None:  # initialise once (the same values on every mesh)
      init = jax.device_get(trainer.init_state())
    state = jax.device_put(init[0], trainer.state_shardings)
    rest = jax.device_put(init[1], trainer.rest_shardings)
    batch = trainer.global_batch(tokens)
    state, metrics, grads = trainer.step_with_grads_fn(state, rest, batch)
    loss = metrics["loss"]
    key = lambda p: jax.tree_util.keystr(p).removesuffix(".value")
    flat_g = {key(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(grads)[0]}
    flat_p = {key(p): x for p, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
    specs[name] = {k: [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]
                   for k, x in flat_p.items()}
    np.savez(os.path.join(out, f"{name}.npz"), loss=np.asarray(loss),
             **{"g" + k: v for k, v in flat_g.items()},
             **{"p" + k: np.asarray(v) for k, v in flat_p.items()})
  with open(os.path.join(out, "specs.json"), "w") as f:
    json.dump(specs, f)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
