"""Checks of a whole training config that run before anything touches disk.

`check_config` resolves the workdir (`train.paths.workdir_path`) and asks
every attention op the model uses whether it can be built for this config:
one abstract evaluation (`jax.eval_shape`, nothing is computed or compiled)
of the op and of its gradient at the run's shapes. An implementation that is
not available, an unsupported shape or a missing gradient is reported as a
`ConfigError` naming the setting, instead of failing at the first step after
the workdir was written. `model.attn_implementation="pallas"` on CPU (no
compiled kernels: they would run in Pallas interpret mode, which is for
tests) is refused unless `model.allow_interpret=true`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from etils import epath

from train import paths
from train.config import Config, ConfigError


def check_attention(config: Config):
  """Raises ConfigError when an attention op of `config.model` cannot be
  built (forward and gradient) at `[1, seq_len, heads, head_dim]`."""
  from train import model as model_lib  # the model module imports the ops

  m = config.model
  if not isinstance(m, model_lib.ModelConfig):
    raise ConfigError(f"model: expected a train.model.ModelConfig, got {type(m).__name__}")
  if (m.attn_implementation == "pallas" and jax.default_backend() == "cpu"
      and not m.allow_interpret):
    raise ConfigError(
        "model.attn_implementation='pallas' on CPU: there are no compiled Pallas "
        "kernels for CPU, so they would run in Pallas interpret mode, which is for "
        "tests and debugging (orders of magnitude slower). Use "
        "model.attn_implementation=xla (or none), or set model.allow_interpret=true "
        "to train in interpret mode anyway.")
  dt = m.compute_dtype
  q = jax.ShapeDtypeStruct((1, config.seq_len, m.num_heads, m.head_dim), dt)
  kv = jax.ShapeDtypeStruct((1, config.seq_len, m.num_kv_heads, m.head_dim), dt)
  for kind in dict.fromkeys(m.layer_types):
    q_search = q if kind == "superlinear" else None
    k_search = kv if (kind == "superlinear" and m.search_key == "accumulated") else None

    def loss(q_, k_, v_, qs_, ks_, kind=kind):
      out = model_lib.attend(kind, m, q_, k_, v_, qs_, ks_)
      return out.astype(jnp.float32).sum()

    try:
      jax.eval_shape(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv, q_search, k_search)
    except Exception as e:  # any failure means "cannot be built"
      text = str(e).strip().splitlines()[0] if str(e).strip() else ""
      raise ConfigError(
          f"model.attn_implementation={m.attn_implementation!r}: the {kind!r} attention "
          f"layers cannot be built for this config (seq_len={config.seq_len}, "
          f"dtype={m.dtype}): {type(e).__name__}: {text}") from None


def check_config(config: Config) -> epath.Path:
  """All checks of a run's config; returns the resolved workdir. Writes
  nothing."""
  try:
    workdir = paths.workdir_path(config.workdir)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  check_attention(config)
  return workdir
