"""Text from a trained checkpoint:
`python -m train.generate --workdir W --prompt TEXT --max-new-tokens N`.

Restores the latest readable checkpoint of a `python -m train` workdir (the
model as its `config.json` describes it), encodes the prompt as bytes (the
models are byte-level, vocabulary 256) and extends it with
`train.decode.generate`, i.e. the layers' KV caches: greedy by default,
`--temperature T` samples from the tempered softmax with the PRNG key of
`--seed` (the same seed gives the same text). Prints the prompt and its
continuation (bytes that are not UTF-8 are shown as U+FFFD).

Exit codes: 0 done; 2 bad arguments, or a workdir without `config.json` or
without a readable checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

__all__ = ["generate_text", "load_run_config", "main", "restore_model"]

_KEEP = object()


def load_run_config(workdir: str):
  """The `train.config.Config` a run was trained with (its `config.json`).

  Keys the file lacks (fields added since) take their defaults, or the
  behaviour runs had before the field existed
  (`train.resume.ADDED_WITH_OLD_BEHAVIOUR`); keys of removed fields are
  ignored. ValueError when there is no readable `config.json`.
  """
  import attn
  from train import paths, resume
  from train.config import Config, DataConfig, ShardingConfig
  from train.model import ModelConfig

  raw = resume.read_saved_config(paths.workdir_path(workdir))
  if raw is None or not isinstance(raw.get("model"), dict):
    raise ValueError(f"--workdir {workdir}: no readable config.json with a model "
                     "(not a `python -m train` run?)")

  def known(cls, d):
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}

  flat = resume.flatten(raw)
  model = dict(raw["model"])
  for key, was in resume.ADDED_WITH_OLD_BEHAVIOUR.items():
    name = key.removeprefix("model.")
    if key.startswith("model.") and name not in model and was(flat) is not None:
      model[name] = was(flat)
  model["superlinear"] = attn.SuperlinearConfig(**model["superlinear"])
  if model.get("layer_pattern") is not None:
    model["layer_pattern"] = tuple(model["layer_pattern"])
  top = known(Config, raw)
  top["mesh_shape"] = tuple(top["mesh_shape"])
  if "mesh_axes" in top:
    top["mesh_axes"] = tuple(top["mesh_axes"])
  top["data"] = DataConfig(**known(DataConfig, raw.get("data", {})))
  if isinstance(raw.get("sharding"), dict):
    rules = known(ShardingConfig, raw["sharding"])
    rules["allow_replication"] = tuple(rules.get("allow_replication", ()))
    top["sharding"] = ShardingConfig(**rules)
  top["model"] = ModelConfig(**known(ModelConfig, model))
  return Config(**top)


def restore_latest(workdir: str):
  """`(config, trainer, step, state)`: the run config, a `train.loop.Trainer`
  for it and the workdir's latest readable checkpoint (`state["params"]`
  etc.). ValueError when there is none."""
  from train import checkpoint as ckpt_lib
  from train import loop, paths

  config = load_run_config(workdir)
  trainer = loop.Trainer(config)
  ck = ckpt_lib.Checkpointer(paths.workdir_path(workdir), keep=config.keep_checkpoints,
                             async_save=False)
  try:
    restored = ck.restore_latest(trainer.abstract_state)
  finally:
    ck.close()
  if restored is None:
    raise ValueError(f"--workdir {workdir}: no readable checkpoint")
  step, state, _ = restored
  return config, trainer, step, state


def restore_model(workdir: str):
  """`(step, model)`: the `train.model.Transformer` of the workdir's latest
  readable checkpoint. ValueError when there is none."""
  from flax import nnx

  _, trainer, step, state = restore_latest(workdir)
  return step, nnx.merge(trainer.graphdef, state["params"], trainer.init_rest())


def generate_text(model, prompt: bytes, *, max_new_tokens: int, temperature: float = 0.0,
                  seed: int = 0, implementation=_KEEP) -> bytes:
  """The bytes `model` (byte-level) generates after `prompt` (not included)."""
  import jax
  import jax.numpy as jnp

  from train import decode

  if model.config.vocab_size != 256:
    raise ValueError(f"the model's vocab_size is {model.config.vocab_size}, not 256: "
                     "it is not a byte-level model")
  if not prompt:
    raise ValueError("prompt is empty: give at least one byte")
  tokens = jnp.asarray([list(prompt)], jnp.int32)
  kw = {} if implementation is _KEEP else dict(implementation=implementation)
  out = decode.generate(model, tokens, max_new_tokens=max_new_tokens,
                        rng=jax.random.key(seed), temperature=temperature, **kw)
  return bytes(int(t) for t in jax.device_get(out[0, len(prompt):]))


def parse_args(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m train.generate",
      description="Generate text from the latest checkpoint of a training workdir.")
  parser.add_argument("--workdir", required=True, help="a `python -m train` workdir")
  parser.add_argument("--prompt", required=True, help="text to continue (UTF-8 bytes)")
  parser.add_argument("--max-new-tokens", type=int, default=200,
                      help="bytes to generate (default 200)")
  parser.add_argument("--temperature", type=float, default=0.0,
                      help="0 = greedy (default); > 0 samples from softmax(logits / T)")
  parser.add_argument("--seed", type=int, default=0,
                      help="PRNG seed of the sampling (default 0)")
  parser.add_argument("--implementation", choices=("reference", "xla", "pallas"),
                      default=None, help="attention implementation of the decode steps "
                      "(default: the run's model.attn_implementation)")
  parser.add_argument("--json", action="store_true",
                      help="print a JSON object (step, prompt, text, token ids) instead")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.max_new_tokens < 0:
    print(f"error: --max-new-tokens={args.max_new_tokens}: must be >= 0", file=sys.stderr)
    return 2
  if not args.temperature >= 0.0:
    print(f"error: --temperature={args.temperature}: must be >= 0", file=sys.stderr)
    return 2
  prompt = args.prompt.encode("utf-8")
  try:
    step, model = restore_model(args.workdir)
    impl = _KEEP if args.implementation is None else args.implementation
    new = generate_text(model, prompt, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, seed=args.seed, implementation=impl)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps({"step": int(step), "prompt": args.prompt,
                      "text": new.decode("utf-8", errors="replace"),
                      "tokens": list(new)}))
  else:
    print(f"[checkpoint step {step}]", file=sys.stderr)
    print(args.prompt + new.decode("utf-8", errors="replace"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
