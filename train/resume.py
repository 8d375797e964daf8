"""Starting a run: fresh, or resumed from its workdir without silent changes.

`start_state` decides where a run begins and refuses what would lose work or
change a run silently:

- Without `--resume`, a workdir that holds checkpoints is refused.
- With `--resume`, the current config is compared with the workdir's
  `config.json`. Keys in `RESUMABLE_KEYS` (length of the run, checkpoint and
  log cadence, workdir, parallelism and implementation choices that compute
  the same function) may change freely. Any other difference (seed,
  batch_size, seq_len, data source/size/shuffle, optimizer, model) changes
  the data stream or the model's meaning and is refused with a
  `ResumeConfigError` that names every key with its old and new value, unless
  the caller opts in (`allow_config_change=True`, `--allow-config-change`).
- A checkpoint that reads but does not fit the state the config builds is an
  `IncompatibleCheckpointError` naming the differing config keys; nothing is
  moved, deleted or truncated.
- Asking for fewer `steps` than the checkpoint already holds is an error.
- `--resume` into a workdir without a checkpoint is a `NothingToResumeError`
  unless the caller opts in to a fresh start (`allow_fresh_start=True`,
  `--allow-fresh-start`, e.g. for a job restarted before its first save).

Whenever `config.json` is rewritten with a different config, the difference
is appended to `config_changes.jsonl` (`{"step", "time", "resume", "opt_in",
"changes": {key: {"old", "new"}}}`), so the history of a workdir stays
readable. Nothing is written before every check has passed.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from typing import Any

import jax
from etils import epath

from train import checkpoint as ckpt_lib
from train import paths
from train.config import Config, to_dict

CONFIG_FILE = "config.json"
CHANGES_FILE = "config_changes.jsonl"

# Keys (dotted) that may differ between a run and its resumption without an
# opt-in: they change how long the run is, how often it saves and logs, where
# it lives, or how the same computation is laid out, never which data it reads
# or what it optimises. `steps` also sets the length of the cosine decay, so
# extending a run stretches the remaining schedule (recorded like any change).
RESUMABLE_KEYS = frozenset({
    "workdir", "steps", "checkpoint_every", "keep_checkpoints", "async_checkpoints",
    "log_every", "eval_every", "eval_batches", "tensorboard", "mesh_shape", "mesh_axes",
    "grad_accum",
    "data.num_threads", "data.prefetch", "model.attn_implementation",
    "model.allow_interpret", "model.remat", "model.superlinear_remat",
    # Sharding rules place the same arrays differently; checkpoints restore
    # onto any placement.
    "sharding.vocab", "sharding.embed", "sharding.q_heads", "sharding.kv_heads",
    "sharding.head_dim", "sharding.mlp", "sharding.norm", "sharding.allow_replication",
    "sharding.sequence",
    "debug_nan_at_step", "debug_trace_data", "debug_step_delay",
})

_ABSENT = "(absent)"


class NothingToResumeError(FileNotFoundError):
  """`--resume` into a workdir that holds no checkpoint (without opting in
  to a fresh start)."""


class ResumeConfigError(ckpt_lib.IncompatibleCheckpointError):
  """`--resume` with a config that differs in keys outside `RESUMABLE_KEYS`."""


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """`{"a": {"b": 1}}` -> `{"a.b": 1}` (lists are values)."""
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def _defaults(config: Config) -> dict[str, Any]:
  """Flattened defaults of `config`'s dataclasses (what a key absent from an
  older config.json meant)."""
  model = config.model
  try:
    default_model = type(model)() if dataclasses.is_dataclass(model) else None
  except TypeError:
    default_model = None
  return flatten(to_dict(Config(model=default_model)))


# Fields added after runs existed whose default is not what those runs did:
# `key -> f(saved flat config)` gives the value a saved config without the key
# ran with (None: the default), so resuming it under today's default is a
# change, reported and refused like any other.
ADDED_WITH_OLD_BEHAVIOUR = {
    # Before `search_rope` existed the accumulated search key used RoPE.
    "model.search_rope": lambda old: (True if old.get("model.search_key") == "accumulated"
                                      else None),
}


def config_changes(saved: dict, config: Config) -> dict[str, tuple[Any, Any]]:
  """`{dotted key: (old, new)}` for every key whose value differs between the
  saved `config.json` dict and `config`. A key the saved config lacks (a field
  added since) counts as its default, or as the behaviour runs had before it
  existed (`ADDED_WITH_OLD_BEHAVIOUR`); a key only the saved config has (a
  field removed since) cannot be set any more and is ignored."""
  old, new = flatten(saved), flatten(to_dict(config))
  defaults = _defaults(config)
  for key, was in ADDED_WITH_OLD_BEHAVIOUR.items():
    value = was(old)
    if value is not None:
      defaults[key] = value
  out = {}
  for key, value in new.items():
    before = old.get(key, defaults.get(key, _ABSENT))
    if before != value:
      out[key] = (before, value)
  return out


def format_changes(changes: dict[str, tuple[Any, Any]]) -> str:
  return ", ".join(f"{k}: {json.dumps(o)} -> {json.dumps(n)}" for k, (o, n) in changes.items())


def read_saved_config(workdir: epath.Path) -> dict | None:
  """The workdir's config.json as a dict; None when absent or unreadable (a
  warning says which)."""
  path = workdir / CONFIG_FILE
  text = paths.read_text(path)
  if text is None:
    return None
  try:
    saved = json.loads(text)
  except json.JSONDecodeError as e:
    warnings.warn(f"{path} is not valid JSON ({e}); the config cannot be compared "
                  "with the saved one", stacklevel=2)
    return None
  return saved if isinstance(saved, dict) else None


def check_resume_changes(changes: dict[str, tuple[Any, Any]], workdir: epath.Path, *,
                         allow_config_change: bool) -> dict[str, tuple[Any, Any]]:
  """The changes outside `RESUMABLE_KEYS`; raises ResumeConfigError for them
  unless `allow_config_change`."""
  refused = {k: v for k, v in changes.items() if k not in RESUMABLE_KEYS}
  if refused and not allow_config_change:
    raise ResumeConfigError(
        f"--resume: the config differs from the one {workdir} was trained with in "
        f"keys that change the data stream or the model: {format_changes(refused)}. "
        f"Resume with the same values, start a new workdir, or pass "
        f"--allow-config-change to continue with the new values (the change is "
        f"recorded in {workdir / CHANGES_FILE}). Keys that may change on resume: "
        f"{', '.join(sorted(RESUMABLE_KEYS))}.")
  return refused


@dataclasses.dataclass
class Start:
  """Where a run begins."""
  step: int
  state: Any
  rest: Any
  changes: dict[str, tuple[Any, Any]]  # vs the saved config.json (empty if none)
  opt_in: bool  # changes outside RESUMABLE_KEYS were accepted by opt-in


def start_state(config: Config, workdir: epath.Path, trainer, checkpointer, iterator, *,
                resume: bool, allow_config_change: bool,
                allow_fresh_start: bool = False) -> Start:
  """Restores (with `resume`) or initialises the train state, after every
  check; writes nothing. `iterator` gets the restored data position.
  `allow_fresh_start`: with `resume`, start from step 0 when the workdir has
  no checkpoint (otherwise `NothingToResumeError`)."""
  existing = checkpointer.all_steps()
  if existing and not resume:
    raise FileExistsError(
        f"{checkpointer.directory} already holds checkpoints (steps {existing}): pass "
        "--resume to continue, or use a new workdir")
  if resume and not existing and not allow_fresh_start:
    raise NothingToResumeError(
        f"--resume: {checkpointer.directory} holds no checkpoint, so there is nothing to "
        "resume. Check the workdir, drop --resume to start a new run, or pass "
        "--allow-fresh-start to start from step 0 when nothing was saved yet")
  saved = read_saved_config(workdir)
  changes = config_changes(saved, config) if saved is not None else {}
  refused = {}
  if resume and existing:
    refused = check_resume_changes(changes, workdir, allow_config_change=allow_config_change)
    if saved is None:
      _log(f"WARNING: --resume: {workdir / CONFIG_FILE} is missing or unreadable, so the "
           "config cannot be compared with the one the checkpoints were written with; "
           "only the checkpoint's shapes are checked")
  if resume:
    try:
      restored = checkpointer.restore_latest(trainer.abstract_state)
    except ckpt_lib.IncompatibleCheckpointError as e:
      differing = format_changes(changes) if saved is not None else (
          f"unknown ({workdir / CONFIG_FILE} is missing)")
      raise ckpt_lib.IncompatibleCheckpointError(
          f"--resume: {e}. Config keys that differ from the saved config: {differing}. "
          f"Nothing in {workdir} was changed; resume with the config the checkpoint "
          "was written with, or use a new workdir") from None
    if restored is not None:
      step, state, data_state = restored
      if step > config.steps:
        raise ValueError(
            f"steps={config.steps}: the checkpoint in {checkpointer.directory} is "
            f"already at step {step}; pass steps >= {step} to resume this run (steps "
            "counts from the start of the run)")
      iterator.set_state(data_state)
      return Start(step, state, trainer.init_rest(), changes, bool(refused))
    if existing:
      _log(f"--resume: no readable checkpoint in {checkpointer.directory}; starting "
           "from step 0")
  state, rest = trainer.init_state()
  return Start(0, state, rest, changes, bool(refused))


def record_config(config: Config, workdir: epath.Path, start: Start, *, resume: bool):
  """Writes config.json (the config the run now uses) and, when it differs
  from the previous one, appends the difference to config_changes.jsonl.
  Primary process only."""
  if jax.process_index() != 0:
    return
  workdir.mkdir(parents=True, exist_ok=True)
  if start.changes:
    log = paths.JsonlLog(workdir / CHANGES_FILE)
    try:
      log.write({"step": start.step, "time": time.time(), "resume": resume,
                 "opt_in": start.opt_in,
                 "changes": {k: {"old": o, "new": n} for k, (o, n) in start.changes.items()}})
    finally:
      log.close()
    _log(f"config changes since the previous run, recorded in {workdir / CHANGES_FILE}: "
         f"{format_changes(start.changes)}")
  paths.write_text_atomic(workdir / CONFIG_FILE,
                          json.dumps(paths.json_safe(to_dict(config)), indent=2))


def _log(msg: str):
  if jax.process_index() == 0:
    import sys
    print(msg, file=sys.stderr, flush=True)
