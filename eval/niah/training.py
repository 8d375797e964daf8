"""NIAH model variants and their small trainer."""

from __future__ import annotations

import functools
import math

import numpy as np

from eval.niah.tasks import TextNeedleTask

__all__ = ["SUPERLINEAR_KW", "VARIANTS", "model_config", "train_model"]


# The passkey comparison's superlinear settings: a 15-key window (sw_index=3,
# W = 4**2 - 1) so that most needles lie outside it, two spans, the balanced
# p = sigma = 1/2 with the coverage-minimal backward factor 2.
SUPERLINEAR_KW = dict(sw_index=3, num_spans=2, search_power=0.5, span_power=0.5,
                      backward_factor=2.0, forward_factor=1.0)

# name -> ModelConfig overrides. "sliding" layers use the superlinear window.
# The hybrids put one superlinear layer after a sliding-window layer, so the
# final query must route itself (no later layer can relay what other
# positions found).
VARIANTS = {
    "dense": dict(attention="dense"),
    "sliding": dict(attention="sliding"),
    "superlinear_k": dict(attention="superlinear", search_key="k"),
    "superlinear_acc": dict(attention="superlinear", search_key="accumulated"),
    "hybrid": dict(layer_pattern=("sliding", "superlinear"), search_key="k"),
    "hybrid_acc": dict(layer_pattern=("sliding", "superlinear"), search_key="accumulated",
                       search_rope=False),
    "hybrid_acc_rope": dict(layer_pattern=("sliding", "superlinear"),
                            search_key="accumulated", search_rope=True),
    "ppa": dict(attention="ppa"),
}


def model_config(variant: str, task, *, superlinear=None, **overrides):
  """The small `ModelConfig` of a variant: 2 layers, d_model 64, 2 heads of 32.

  `superlinear`: an `attn.SuperlinearConfig` (default: `SUPERLINEAR_KW`);
  `window` defaults to its window.
  """
  from attn import SuperlinearConfig
  from train.model import ModelConfig

  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
  sl = superlinear if superlinear is not None else SuperlinearConfig(**SUPERLINEAR_KW)
  kw = dict(vocab_size=task.vocab_size, d_model=64, num_layers=2, num_heads=2,
            num_kv_heads=2, head_dim=32, mlp_dim=256, superlinear=sl,
            window=sl.window)
  kw.update(VARIANTS[variant])
  kw.update(overrides)
  return ModelConfig(**kw)


def train_model(config, task, *, steps: int, batch_size: int = 32,
                seq_len: int = 128, lr: float = 3e-3, weight_decay: float = 0.01,
                seed: int = 0, log_every: int = 25, lm_weight: float = 0.0,
                warm_steps: int = 0, warm_len: int = 0, warm_batch: int = 0,
                progress=None):
  """Train a fresh `Transformer(config)` on a NIAH task.

  AdamW (linear warmup over the first 10% of steps, max 20, then cosine decay
  to 0.1 lr), global-norm clipping at 1, one jitted NNX train step
  (split/merge, donated state). Loss: cross entropy of the answer at the last
  position, plus `lm_weight` times the mean next-byte cross entropy over the
  positions whose target is a text byte (`TextNeedleTask` only).

  Args:
    config: a `train.model.ModelConfig` (vocab_size >= task.vocab_size).
    task: `PasskeyTask` or `TextNeedleTask` (training split haystacks).
    steps, batch_size, seq_len, lr, weight_decay, seed: as named; the
      model is initialised with `nnx.Rngs(seed)` and data drawn from
      `np.random.default_rng([seed, 1])`.
    log_every: record (step, loss, acc) every this many steps.
    lm_weight: weight of the language-modelling loss on the text.
    warm_steps, warm_len, warm_batch: a length curriculum: the first
      `warm_steps` steps (of `steps`) use sequences of `warm_len` tokens in
      batches of `warm_batch`; the rest use `seq_len` and `batch_size`.
    progress: optional `callback(step, loss, acc)` called at each record.

  Returns:
    `(model, history)`: the trained `Transformer` and a list of
    `[step, answer_loss, train_accuracy]` (float) records.
  """
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from train.model import Transformer

  if config.vocab_size < task.vocab_size:
    raise ValueError("config.vocab_size is smaller than the task vocabulary")
  if lm_weight and not isinstance(task, TextNeedleTask):
    raise ValueError("lm_weight > 0 needs a TextNeedleTask (text to model)")
  model = Transformer(config, rngs=nnx.Rngs(seed))
  warmup = max(1, min(20, steps // 10))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup_steps=warmup, decay_steps=max(steps, warmup + 1),
      end_value=0.1 * lr)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(schedule, weight_decay=weight_decay))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  @functools.partial(jax.jit, donate_argnums=0)
  def step_fn(state, tokens, targets):
    model, optimizer = nnx.merge(graphdef, state)

    def loss_fn(model):
      all_logits = model(tokens)                                  # [b, L, vocab]
      logits = all_logits[:, -1]
      loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
      acc = jnp.mean(jnp.argmax(logits, axis=-1) == targets)
      total = loss
      if lm_weight:
        nxt = tokens[:, 1:]
        ce = optax.softmax_cross_entropy_with_integer_labels(all_logits[:, :-1], nxt)
        is_text = (nxt < 256).astype(jnp.float32)
        total = loss + lm_weight * jnp.sum(ce * is_text) / jnp.maximum(jnp.sum(is_text), 1)
      return total, (loss, acc)

    (_, (loss, acc)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss, acc

  rng = np.random.default_rng([seed, 1])
  history = []
  losses, accs = [], []
  if warm_steps and not (0 < warm_steps < steps and warm_len >= 8 and warm_batch >= 1):
    raise ValueError(f"warm_steps={warm_steps}, warm_len={warm_len}, warm_batch={warm_batch}: "
                     "need 0 < warm_steps < steps, warm_len >= 8 and warm_batch >= 1")
  for step in range(1, steps + 1):
    warm = step <= warm_steps
    b = task.batch(rng, warm_batch if warm else batch_size, warm_len if warm else seq_len,
                   split="train")
    state, loss, acc = step_fn(state, jnp.asarray(b.tokens), jnp.asarray(b.targets))
    losses.append(loss)
    accs.append(acc)
    if step % log_every == 0 or step == steps:
      loss_v = float(np.mean(jax.device_get(losses)))
      acc_v = float(np.mean(jax.device_get(accs)))
      if not math.isfinite(loss_v):
        raise FloatingPointError(f"non-finite loss {loss_v} at step {step}")
      history.append([step, loss_v, acc_v])
      losses, accs = [], []
      if progress is not None:
        progress(step, loss_v, acc_v)
  model, _ = nnx.merge(graphdef, state)
  return model, history
