"""A micro training config for the tests (CPU, seconds): 1 layer, d_model 32."""

from train.config import Config, DataConfig
from train.model import ModelConfig


def get_config() -> Config:
  return Config(
      workdir="/tmp/subq_micro",
      steps=30,
      seed=0,
      batch_size=8,
      seq_len=32,
      learning_rate=3e-3,
      warmup_steps=3,
      checkpoint_every=5,
      keep_checkpoints=3,
      log_every=1,
      tensorboard=False,
      mesh_shape=(-1, 1, 1),
      data=DataConfig(max_bytes=200_000, num_threads=1, prefetch=2),
      model=ModelConfig(vocab_size=256, d_model=32, num_layers=1, num_heads=2,
                        num_kv_heads=1, head_dim=16, mlp_dim=64, window=16),
  )
