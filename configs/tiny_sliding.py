"""Tiny CPU run with `sliding` attention in every layer (see configs/tiny.py)."""

import dataclasses

from configs import tiny


def get_config():
  config = tiny.get_config()
  return dataclasses.replace(
      config, workdir="/tmp/subq_tiny_sliding",
      model=dataclasses.replace(config.model, attention="sliding"))
