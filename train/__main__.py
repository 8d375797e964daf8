"""`python -m train --config configs/<name>.py [--set key=value]... [--resume]`

Exit codes: 0 finished (or nothing left to train), or stopped by
SIGTERM/SIGINT after saving a checkpoint; 2 bad command line / config (the
message names the key), checked before anything is written, or a `--resume`
whose config or checkpoint does not fit the workdir's run (nothing is moved or
truncated), or a `--resume` into a workdir without a checkpoint (unless
`--allow-fresh-start`); 3 the loss became NaN/Inf (the last good checkpoint is kept).
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m train",
      description="Train a language model with sub-quadratic attention.")
  parser.add_argument("--config", required=True,
                      help="a python file defining get_config() -> train.config.Config")
  parser.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="KEY=VALUE",
                      help="override a config value, dotted keys (repeatable), "
                           "e.g. --set model.attention=ppa --set steps=100")
  parser.add_argument("--resume", action="store_true",
                      help="continue from the latest readable checkpoint in the workdir")
  parser.add_argument("--allow-config-change", action="store_true",
                      help="with --resume: continue although keys that change the data "
                           "stream or the model differ from the workdir's config.json "
                           "(the change is recorded in config_changes.jsonl)")
  parser.add_argument("--allow-fresh-start", action="store_true",
                      help="with --resume: start from step 0 when the workdir holds no "
                           "checkpoint yet (e.g. a job restarted before its first save) "
                           "instead of exiting with code 2")
  parser.add_argument("--print-config", action="store_true",
                      help="print the resolved config as JSON and exit")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.allow_fresh_start and not args.resume:
    print("error: --allow-fresh-start only applies with --resume", file=sys.stderr)
    return 2
  from train.config import ConfigError, apply_overrides, load_config, to_dict
  try:
    config = apply_overrides(load_config(args.config), args.overrides)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.print_config:
    import json
    print(json.dumps(to_dict(config), indent=2))
    return 0

  from train import distributed
  distributed.initialize()  # before any other JAX use
  from train import loop
  from train.checkpoint import IncompatibleCheckpointError
  try:
    result = loop.train(config, resume=args.resume,
                        allow_config_change=args.allow_config_change,
                        allow_fresh_start=args.allow_fresh_start)
  except (FileExistsError, FileNotFoundError, ValueError, IncompatibleCheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(result.message, file=sys.stderr, flush=True)
  if result.status == "nan":
    return 3
  return 0


if __name__ == "__main__":
  sys.exit(main())
