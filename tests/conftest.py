"""Test setup: two simulated CPU devices, a private data cache, and small configs."""

import os
import sys

# Must precede the first `import jax` anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

import jax  # noqa: E402
import pytest  # noqa: E402

from configs import synthetic  # noqa: E402

jax.config.update("jax_compilation_cache_dir",
                  os.path.join(os.path.expanduser("~"), ".cache", "mian_jax_test_xla"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
  """Prepared data goes to a per-session temporary cache, never the user's."""
  monkeypatch.setenv("MIAN_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def tiny_config(**overrides):
  """The synthetic config shrunk to seconds: embed 4, seq 6, batch 16."""
  config = synthetic.get_config()
  s = config.data.synthetic
  s.num_users, s.num_items, s.num_categories, s.num_occupations = 60, 40, 5, 6
  s.num_train, s.num_valid, s.num_test = 1024, 256, 256
  s.min_seq_len, s.short_seq_len, s.recent_window = 2, 1, 3
  config.data.max_seq_len = 6
  config.model.embed_dim = 4
  config.model.num_heads = 2
  config.model.gim_dim = 8
  config.model.mlp_dims = (8, 4)
  config.train.batch_size = 16
  config.train.num_train_steps = 8
  config.train.log_every_steps = 4
  config.train.eval_every_steps = 4
  config.eval.batch_size = 64
  config.checkpoint.every_steps = 4
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = value
  return config

