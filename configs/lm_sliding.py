"""`configs/lm_shakespeare.py` with a 64-key sliding window in both layers."""

import dataclasses

from configs import lm_shakespeare


def get_config():
  config = lm_shakespeare.get_config()
  return dataclasses.replace(config, workdir="/tmp/subq_lm_sliding",
                             model=dataclasses.replace(config.model, attention="sliding"))
