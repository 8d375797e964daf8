"""Tiny CPU hybrid: sliding-window layers with a superlinear layer every 4th
(accumulated search keys), the mix users deploy (see configs/tiny.py)."""

import dataclasses

from configs import tiny


def get_config():
  config = tiny.get_config()
  return dataclasses.replace(
      config, workdir="/tmp/subq_tiny_hybrid",
      model=dataclasses.replace(
          config.model, num_layers=4,
          layer_pattern=("sliding", "sliding", "sliding", "superlinear"),
          search_key="accumulated"))
