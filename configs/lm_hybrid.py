"""`configs/lm_shakespeare.py` as a hybrid: a 63-key sliding window then one
superlinear layer (default `attn.SuperlinearConfig`: window 63, 2 spans)."""

import dataclasses

from configs import lm_shakespeare


def get_config():
  config = lm_shakespeare.get_config()
  return dataclasses.replace(
      config, workdir="/tmp/subq_lm_hybrid",
      model=dataclasses.replace(config.model, window=63,
                                layer_pattern=("sliding", "superlinear")))
