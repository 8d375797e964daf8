"""An accelerator-sized hybrid run (GPU / TPU): 12 layers, d_model 768,
sliding window 512 in most layers and superlinear attention every 4th layer,
4K context, FSDP over all devices. Scale `batch_size` with the device count.

    python -m train --config configs/base_hybrid.py --set workdir=gs://.../run1
"""

import attn
from train.config import Config, DataConfig
from train.model import ModelConfig


def get_config() -> Config:
  return Config(
      workdir="/tmp/subq_base_hybrid",
      steps=20_000,
      seed=0,
      batch_size=64,
      seq_len=4096,
      learning_rate=6e-4,
      warmup_steps=1_000,
      min_lr_ratio=0.1,
      weight_decay=0.1,
      clip_norm=1.0,
      grad_accum=1,
      checkpoint_every=1_000,
      keep_checkpoints=3,
      log_every=20,
      mesh_shape=(1, -1, 1),
      data=DataConfig(source="stdlib", max_bytes=0, num_threads=4, prefetch=16),
      model=ModelConfig(
          vocab_size=256, d_model=768, num_layers=12, num_heads=12, num_kv_heads=4,
          head_dim=64, mlp_dim=3072, dtype="bfloat16", window=512,
          layer_pattern=("sliding", "sliding", "sliding", "superlinear"),
          superlinear=attn.SuperlinearConfig(sw_index=15, num_spans=4),
          search_key="accumulated"),
  )
