"""Tiny CPU run (dense attention): a 2-layer byte-level model trained on the
Python stdlib sources; finishes in about a minute on a 2-core CPU.

    python -m train --config configs/tiny.py --set workdir=/tmp/tiny
"""

from train.config import Config, DataConfig
from train.model import ModelConfig


def get_config() -> Config:
  return Config(
      workdir="/tmp/subq_tiny",
      steps=300,
      seed=0,
      batch_size=16,
      seq_len=128,
      learning_rate=3e-3,
      warmup_steps=20,
      min_lr_ratio=0.1,
      weight_decay=0.1,
      clip_norm=1.0,
      grad_accum=1,
      checkpoint_every=100,
      keep_checkpoints=3,
      log_every=10,
      mesh_shape=(-1, 1, 1),
      data=DataConfig(source="stdlib", max_bytes=2_000_000),
      model=ModelConfig(
          vocab_size=256, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
          head_dim=16, mlp_dim=256, attention="dense", window=32),
  )
