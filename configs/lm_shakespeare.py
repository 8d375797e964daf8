"""Byte-level language model on the Shakespeare corpus (dense attention), a
CPU-sized run: 2 layers, d_model 64, 1K context, held-out bits per byte every
100 steps. `configs/lm_sliding.py` and `configs/lm_hybrid.py` change only the
attention. Evaluate by context position with `python -m eval.lm`.

    python -m train --config configs/lm_shakespeare.py --set workdir=runs/lm_dense
"""

from train.config import Config, DataConfig
from train.model import ModelConfig


def get_config() -> Config:
  return Config(
      workdir="/tmp/subq_lm_dense",
      steps=300,
      seed=0,
      batch_size=8,
      seq_len=1024,
      learning_rate=3e-3,
      warmup_steps=20,
      min_lr_ratio=0.1,
      weight_decay=0.1,
      clip_norm=1.0,
      checkpoint_every=100,
      keep_checkpoints=2,
      log_every=10,
      eval_every=100,
      eval_batches=2,
      mesh_shape=(-1, 1, 1),
      data=DataConfig(source="shakespeare", max_bytes=0),
      model=ModelConfig(
          vocab_size=256, d_model=64, num_layers=2, num_heads=2, num_kv_heads=2,
          head_dim=32, mlp_dim=256, attention="dense", window=64),
  )
