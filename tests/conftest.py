"""Test setup: two simulated CPU devices and a private data cache. Shared helpers (the tiny
config among them) live in tests/helpers.py."""

import os

# Must precede the first `import jax` anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir",
                  os.path.join(os.path.expanduser("~"), ".cache", "mian_jax_test_xla"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
  """Prepared data goes to a per-session temporary cache, never the user's."""
  monkeypatch.setenv("MIAN_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
