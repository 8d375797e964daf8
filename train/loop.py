"""The training loop: sharded jitted step, AdamW, checkpoints, resume, logging.

`train(config, resume=...)` runs a whole job and returns a `TrainResult`:
- status "done": all `config.steps` steps ran; the final step is checkpointed.
- status "preempted": SIGTERM (or SIGINT) arrived; the current step was saved
  synchronously before returning.
- status "nan": the loss became NaN/Inf; nothing after the last good
  checkpoint is saved (that checkpoint is kept), and a message explains it.

Train state (checkpointed): `{"step", "params", "opt_state"}`; model variables
that are not `nnx.Param` (none in `train.model`) are rebuilt from the seed.
Outputs in `workdir` (a local path or a `gs://` URI, all through
`train.paths`): `checkpoints/`, `metrics.jsonl` (process 0; strict JSON,
null where a value is not finite), `config.json`, `config_changes.jsonl`
(what changed between runs in this workdir), `trace/process_<i>.jsonl` when
`debug_trace_data` (every step's window indices and loss, per process),
TensorBoard events in `tb/` when a SummaryWriter is importable. On resume,
`metrics.jsonl` and the traces are cut back to the restored step, so they read
like one uninterrupted run; that happens only after every check has passed.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from train import checkpoint as ckpt_lib
from train import data as data_lib
from train import evaluate as eval_lib
from train import paths
from train import preflight
from train import resume as resume_lib
from train import sharding as shd
from train.config import Config

ModelFactory = Callable[..., nnx.Module]


_TRAINERS: dict = {}


@dataclasses.dataclass
class TrainResult:
  status: str  # "done" | "preempted" | "nan"
  step: int
  loss: float
  last_checkpoint: int | None
  message: str = ""


def default_model_factory(model_config, *, rngs: nnx.Rngs) -> nnx.Module:
  from train.model import Transformer
  return Transformer(model_config, rngs=rngs)


def _log(msg: str):
  if jax.process_index() == 0:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Optimizer.


def make_schedule(config: Config) -> optax.Schedule:
  decay_steps = max(config.steps, config.warmup_steps + 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if config.warmup_steps else config.learning_rate,
      peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
      decay_steps=decay_steps, end_value=config.learning_rate * config.min_lr_ratio)


def _decay_mask(params):
  # No weight decay on vectors (norm scales, biases).
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config: Config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = make_schedule(config)
  # Clipping off is an identity in the same slot, so that the optimizer state
  # has one structure whatever clip_norm is (a resumed run may change it).
  clip = optax.clip_by_global_norm(config.clip_norm) if config.clip_norm > 0 else optax.identity()
  adamw = optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2,
                      weight_decay=config.weight_decay, mask=_decay_mask)
  return optax.chain(clip, adamw), schedule


# ---------------------------------------------------------------------------
# Model, state and step.


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean next-token cross entropy in float32 (nats)."""
  logits = logits.astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


class Trainer:
  """Builds the sharded train state and the jitted step for a config + mesh."""

  def __init__(self, config: Config, mesh: jax.sharding.Mesh | None = None,
               model_factory: ModelFactory | None = None):
    self.config = config
    self.mesh = mesh if mesh is not None else shd.make_mesh(config.mesh_shape,
                                                            axes=config.mesh_axes)
    self.model_factory = model_factory or default_model_factory
    if config.model is None and model_factory is None:
      raise ValueError("config.model is not set")
    n_batch = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    micro = config.batch_size // config.grad_accum
    if micro % n_batch:
      raise ValueError(f"batch_size / grad_accum = {micro} is not divisible by the "
                       f"data x fsdp mesh size ({n_batch})")
    # Context parallelism: the sequence axis (None: none) and the sharding of
    # the hidden states; inputs and targets [batch, seq_len] are laid out so.
    self.seq_axis = shd.seq_axis(self.mesh, config.sharding)
    spec = shd.activation_spec(self.mesh, config.seq_len, config.sharding)
    self.activations = spec if self.seq_axis is not None else None
    self.tx, self.schedule = make_optimizer(config)

    with nnx.use_eager_sharding(False):
      abstract = nnx.eval_shape(self._new_model)
    self.graphdef, abs_params, abs_rest = nnx.split(abstract, nnx.Param, ...)
    self.param_shardings = shd.state_shardings(abs_params, self.mesh, config.sharding)
    self.rest_shardings = shd.state_shardings(abs_rest, self.mesh, config.sharding)
    abs_opt = jax.eval_shape(self.tx.init, abs_params)
    rep = shd.replicated(self.mesh)
    opt_shardings = optax.tree_map_params(
        self.tx, lambda _, s: s, abs_opt, self.param_shardings,
        transform_non_params=lambda _: rep, is_leaf=_is_var)
    self.state_shardings = {"step": rep, "params": self.param_shardings,
                            "opt_state": opt_shardings}
    abs_state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abs_params,
                 "opt_state": abs_opt}
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abs_state, self.state_shardings)
    self.batch_sharding = shd.batch_sharding(self.mesh, seq=self.seq_axis)
    self._step_fn = None
    self._grad_fn = None
    self._init_fn = None
    self._rest_fn = None

  @classmethod
  def cached(cls, config: Config, mesh=None, model_factory: ModelFactory | None = None):
    """A Trainer shared by configs that compile to the same programs (they
    differ only in workdir, logging, checkpointing or data options), so that
    repeated `train()` calls in one process compile once."""
    if mesh is None:
      mesh = shd.make_mesh(config.mesh_shape, axes=config.mesh_axes)
    key_config = dataclasses.replace(
        config, workdir="-", checkpoint_every=0, keep_checkpoints=1, async_checkpoints=True,
        log_every=1, tensorboard=False, debug_trace_data=False, debug_step_delay=0.0,
        data=type(config.data)())
    key = (key_config, mesh, model_factory)
    trainer = _TRAINERS.get(key)
    if trainer is None:
      trainer = _TRAINERS[key] = cls(config, mesh=mesh, model_factory=model_factory)
    return trainer

  def _new_model(self):
    return self.model_factory(self.config.model, rngs=nnx.Rngs(self.config.seed))

  # -- initialisation -------------------------------------------------------
  def init_state(self) -> tuple[dict, Any]:
    """Fresh `(state, rest)` laid out with the target shardings."""
    if self._init_fn is None:
      def init():
        with nnx.use_eager_sharding(False):
          model = self._new_model()
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "opt_state": self.tx.init(params)}, rest
      self._init_fn = jax.jit(init, out_shardings=(self.state_shardings, self.rest_shardings))
    return self._init_fn()

  def init_rest(self):
    """The non-Param model variables alone (after a restore)."""
    if self._rest_fn is None:
      def init():
        with nnx.use_eager_sharding(False):
          model = self._new_model()
        return nnx.split(model, nnx.Param, ...)[2]
      self._rest_fn = jax.jit(init, out_shardings=self.rest_shardings)
    return self._rest_fn()

  # -- step -------------------------------------------------------------------
  def logits(self, params, rest, inputs):
    """inputs: int32 `[batch, seq_len]` (traced, laid out as `batch_sharding`)
    -> float32 `[batch, seq_len, vocab]`; the model runs context-parallel
    over `seq_axis` when there is one."""
    model = nnx.merge(self.graphdef, params, rest)
    if self.activations is None:
      return model(inputs)
    with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
      return model(inputs, activations=self.activations)

  def _loss(self, params, rest, batch):
    return cross_entropy(self.logits(params, rest, batch["inputs"]), batch["targets"])

  def _loss_and_grads(self, params, rest, batch):
    accum = self.config.grad_accum
    grad_fn = jax.value_and_grad(self._loss)
    if accum == 1:
      return grad_fn(params, rest, batch)
    # Micro-batch a holds rows a, a + A, a + 2A, ...: every device keeps an
    # equal share of every micro-batch.
    spec = jax.sharding.PartitionSpec(None, shd.BATCH_AXES, self.seq_axis)
    micro = {k: jax.lax.with_sharding_constraint(
        x.reshape(x.shape[0] // accum, accum, x.shape[1]).swapaxes(0, 1),
        jax.sharding.NamedSharding(self.mesh, spec)) for k, x in batch.items()}

    def body(carry, x):
      loss_sum, grad_sum = carry
      loss, grads = grad_fn(params, rest, x)
      return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), micro)
    return loss / accum, jax.tree.map(lambda g, p: (g / accum).astype(p.dtype), grads, params)

  def _train_step(self, state, rest, batch):
    new_state, metrics, _ = self._train_step_with_grads(state, rest, batch)
    return new_state, metrics

  def _train_step_with_grads(self, state, rest, batch):
    """batch: `{"inputs", "targets"}` int32 `[batch, seq_len]` (`global_batch`)."""
    params = state["params"]
    loss, grads = self._loss_and_grads(params, rest, batch)
    loss = loss.astype(jnp.float32)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                             for g in jax.tree.leaves(grads)))
    updates, opt_state = self.tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    step = state["step"] + 1
    if self.config.debug_nan_at_step >= 0:
      loss = jnp.where(step == self.config.debug_nan_at_step, jnp.nan, loss)
    metrics = {"loss": loss, "grad_norm": grad_norm,
               "lr": jnp.asarray(self.schedule(state["step"]), jnp.float32)}
    return {"step": step, "params": new_params, "opt_state": opt_state}, metrics, grads

  @property
  def step_fn(self):
    if self._step_fn is None:
      rep = shd.replicated(self.mesh)
      donate = (0,) if jax.default_backend() != "cpu" else ()
      self._step_fn = jax.jit(
          self._train_step,
          in_shardings=(self.state_shardings, self.rest_shardings, self.batch_sharding),
          out_shardings=(self.state_shardings, rep), donate_argnums=donate)
    return self._step_fn

  @property
  def step_with_grads_fn(self):
    """Jitted `(state, rest, batch) -> (new_state, metrics, grads)` (for tests)."""
    rep = shd.replicated(self.mesh)
    return jax.jit(
        self._train_step_with_grads,
        in_shardings=(self.state_shardings, self.rest_shardings, self.batch_sharding),
        out_shardings=(self.state_shardings, rep, self.param_shardings))

  @property
  def grad_fn(self):
    """Jitted `(params, rest, batch) -> (loss, grads)` (for tests)."""
    if self._grad_fn is None:
      rep = shd.replicated(self.mesh)
      self._grad_fn = jax.jit(
          self._loss_and_grads,
          in_shardings=(self.param_shardings, self.rest_shardings, self.batch_sharding),
          out_shardings=(rep, self.param_shardings))
    return self._grad_fn

  def data_shard(self) -> dict:
    """`{"shard_index", "shard_count"}` of this process's rows of every global
    batch (`train.data.make_iterator(config, **trainer.data_shard())`; see
    `train.sharding.data_shard`)."""
    return shd.data_shard(self.batch_sharding, self.config.seq_len)

  def global_batch(self, local_tokens: np.ndarray) -> dict:
    """This process's windows `[rows, seq_len + 1]` -> `{"inputs",
    "targets"}`, global int32 `[batch, seq_len]` laid out as `batch_sharding`
    (`train.sharding.global_inputs`)."""
    return shd.global_inputs(local_tokens, self.batch_sharding,
                             self.data_shard()["shard_count"])


# ---------------------------------------------------------------------------
# Logging.


class Progress:
  """One stderr line: step, loss, tokens/s, ETA. Redrawn in place on a TTY,
  printed every `every` steps otherwise."""

  def __init__(self, total: int, start: int, tokens_per_step: int, every: int,
               stream=None):
    self.total, self.start, self.tokens_per_step, self.every = total, start, tokens_per_step, every
    self.stream = stream = stream if stream is not None else sys.stderr
    self.tty = hasattr(stream, "isatty") and stream.isatty()
    self.t_first = None  # time after the first (compiling) step
    self.n_first = start
    self.last_draw = 0.0
    self.rate = float("nan")
    self.extra = ""  # appended to the line, e.g. the latest held-out bits per byte
    self.enabled = jax.process_index() == 0

  def update(self, step: int, loss: float, force: bool = False):
    now = time.perf_counter()
    if self.t_first is None:
      self.t_first, self.n_first = now, step
    elif step > self.n_first:
      self.rate = (step - self.n_first) * self.tokens_per_step / (now - self.t_first)
    if not self.enabled:
      return
    due = (step % self.every == 0) or step == self.total or force
    if self.tty:
      if not (due or now - self.last_draw > 0.2):
        return
    elif not due:
      return
    self.last_draw = now
    if math.isfinite(self.rate) and self.rate > 0:
      eta = (self.total - step) * self.tokens_per_step / self.rate
      speed = f"{self.rate:,.0f} tok/s"
      eta_s = time.strftime("%H:%M:%S", time.gmtime(eta))
    else:
      speed, eta_s = "- tok/s", "--:--:--"
    width = len(str(self.total))
    pct = 100.0 * step / self.total
    bar_n = int(20 * step / self.total)
    line = (f"[{'#' * bar_n}{'.' * (20 - bar_n)}] {step:>{width}}/{self.total} "
            f"{pct:5.1f}% | loss {loss:.4f}{self.extra} | {speed} | ETA {eta_s}")
    if self.tty:
      self.stream.write("\r" + line + "\x1b[K")
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  def close(self):
    if self.enabled and self.tty:
      self.stream.write("\n")
      self.stream.flush()


def _tensorboard_writer(logdir: str):
  for modname, attr in (("tensorboardX", "SummaryWriter"),
                        ("torch.utils.tensorboard", "SummaryWriter")):
    try:
      module = __import__(modname, fromlist=[attr])
      return getattr(module, attr)(logdir)
    except Exception:
      continue
  return None


class _StopFlag:
  def __init__(self):
    self.signum = None

  def __call__(self, signum, frame):
    if self.signum is None:
      self.signum = signum
      try:
        print(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint and exiting",
              file=sys.stderr, flush=True)
      except Exception:
        pass


def _all_processes_any(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.array([flag], np.bool_))))


# ---------------------------------------------------------------------------
# The job.


def train(config: Config, *, resume: bool = False, allow_config_change: bool = False,
          allow_fresh_start: bool = False, model_factory: ModelFactory | None = None, mesh=None,
          handle_signals: bool = True) -> TrainResult:
  """Runs (or resumes) the training job described by `config`.

  Every check (the config as a whole, the workdir path, the attention ops,
  the mesh, a resumed run's config and checkpoint) runs before anything is
  written; see `train.preflight` and `train.resume`. `allow_config_change`
  lets `resume` continue with keys outside `resume.RESUMABLE_KEYS` changed
  (recorded in `config_changes.jsonl`); `allow_fresh_start` lets `resume`
  start from step 0 in a workdir without a checkpoint.
  """
  workdir = (paths.workdir_path(config.workdir) if model_factory is not None
             else preflight.check_config(config))
  primary = jax.process_index() == 0
  pid = jax.process_index()

  trainer = Trainer.cached(config, mesh=mesh, model_factory=model_factory)
  iterator = data_lib.make_iterator(config, **trainer.data_shard())
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints,
                                       async_save=config.async_checkpoints)
  try:
    begin = resume_lib.start_state(config, workdir, trainer, checkpointer, iterator,
                                   resume=resume, allow_config_change=allow_config_change,
                                   allow_fresh_start=allow_fresh_start)
  except BaseException:
    checkpointer.close()
    raise
  start, state, rest = begin.step, begin.state, begin.rest
  if resume and start:
    _log(f"resuming from checkpoint step {start} of {checkpointer.directory}")
  resume_lib.record_config(config, workdir, begin, resume=resume)
  metrics = paths.JsonlLog(workdir / "metrics.jsonl", keep_until_step=start) if primary else None
  trace = (paths.JsonlLog(workdir / "trace" / f"process_{pid}.jsonl", keep_until_step=start)
           if config.debug_trace_data else None)

  tb = _tensorboard_writer(str(workdir / "tb")) if (primary and config.tensorboard) else None
  stop = _StopFlag()
  old_handlers = {}
  if handle_signals and threading.current_thread() is threading.main_thread():
    for sig in (signal.SIGTERM, signal.SIGINT):
      old_handlers[sig] = signal.signal(sig, stop)

  tokens_per_step = config.batch_size * config.seq_len
  progress = Progress(config.steps, start, tokens_per_step, config.log_every)
  heldout = eval_lib.HeldoutEval(trainer, config) if config.eval_every else None
  last_ckpt = start if start else None
  step, loss = start, float("nan")
  result = None
  try:
    while step < config.steps:
      batch = next(iterator)
      state, step_metrics = trainer.step_fn(state, rest, trainer.global_batch(batch["tokens"]))
      step_metrics = jax.device_get(step_metrics)
      step += 1
      loss = float(step_metrics["loss"])
      if trace is not None:
        trace.write({"step": step, "indices": batch["index"].tolist(), "loss": loss})
      if not math.isfinite(loss):
        where = (f"step {last_ckpt} in {checkpointer.directory}" if last_ckpt
                 else "none (no checkpoint was written yet)")
        msg = (f"non-finite loss ({loss}) at step {step}: stopping. Nothing after the last "
               f"good checkpoint is saved; last good checkpoint: {where}. Lower "
               f"learning_rate / check the data, then resume with --resume.")
        result = TrainResult("nan", step, loss, last_ckpt, msg)
        break
      val = None
      if heldout is not None and (step % config.eval_every == 0 or step == config.steps):
        val = heldout(state["params"], rest)
        progress.extra = f" | val {val:.3f} bpb"
      progress.update(step, loss)
      if step % config.log_every == 0 or step == config.steps or val is not None:
        record = {"step": step, "loss": loss, "bits_per_byte": loss / math.log(2),
                  "grad_norm": float(step_metrics["grad_norm"]),
                  "lr": float(step_metrics["lr"]), "tokens": step * tokens_per_step,
                  "tokens_per_s": progress.rate, "time": time.time()}
        if val is not None:
          record["val_bits_per_byte"] = val
        record = paths.json_safe(record)  # the first record has no rate yet: null
        if metrics is not None:
          metrics.write(record)
        if tb is not None:
          for k in ("loss", "grad_norm", "lr", "tokens_per_s"):
            if record[k] is not None:
              tb.add_scalar(f"train/{k}", record[k], step)
      preempt = _all_processes_any(stop.signum is not None)
      periodic = config.checkpoint_every and step % config.checkpoint_every == 0
      if periodic or step == config.steps or preempt:
        if checkpointer.save(step, state, iterator.get_state()):
          last_ckpt = step
        for log in (metrics, trace):
          if log is not None:
            log.flush()  # remote logs are rewritten here
      if config.debug_step_delay:
        time.sleep(config.debug_step_delay)
      if preempt:
        checkpointer.wait()
        msg = (f"stopped by signal at step {step}; checkpoint saved to "
               f"{checkpointer.directory}/{step}; continue with --resume")
        result = TrainResult("preempted", step, loss, last_ckpt, msg)
        break
    if result is None and step == start:
      last = metrics.last if metrics is not None else None
      if last is not None and last.get("loss") is not None:
        loss = float(last["loss"])
      result = TrainResult("done", step, loss, last_ckpt,
                           f"nothing to train: the run is already at step {step} of "
                           f"steps={config.steps} (raise steps to train further)")
    elif result is None:
      result = TrainResult("done", step, loss, last_ckpt,
                           f"finished {step} steps; final loss {loss:.4f}")
  finally:
    progress.close()
    checkpointer.close()  # waits for the async save in flight
    for sig, handler in old_handlers.items():
      signal.signal(sig, handler)
    for log in (metrics, trace):
      if log is not None:
        log.close()
    if tb is not None:
      tb.close()
  return result
