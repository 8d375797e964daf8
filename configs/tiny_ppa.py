"""Tiny CPU run with `ppa` attention in every layer (see configs/tiny.py)."""

import dataclasses

from configs import tiny


def get_config():
  config = tiny.get_config()
  return dataclasses.replace(
      config, workdir="/tmp/subq_tiny_ppa",
      model=dataclasses.replace(config.model, attention="ppa"))
