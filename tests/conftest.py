"""Test setup: two simulated CPU devices, a private data cache per session, and XLA's compiled
programs kept in ~/.cache/mian_jax_test_xla (shared by runs and xdist workers, not private).
Shared helpers (the tiny config among them) live in tests/helpers.py."""

import os

# XLA compiles about 4x faster without its backend optimisations and fusion emitters; the
# tiny test programs spend far longer compiling than running, and the tests check results, not
# speed (benchmarks measure with the defaults). Subprocesses inherit the flags.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
# Must precede the first `import jax` anywhere in the test session.
os.environ.setdefault("XLA_FLAGS",
                      f"--xla_force_host_platform_device_count=2 {FAST_COMPILE_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

# Persistent, not per session: a cold cache cost test_train.py and test_optim.py 38% more CPU
# time (62 s against 45 s, measured). Holds only XLA programs, never data or results.
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(os.path.expanduser("~"), ".cache", "mian_jax_test_xla"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
  """Prepared data goes to a per-session temporary cache, never the user's."""
  monkeypatch.setenv("MIAN_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(autouse=True, scope="session")
def _quiet_libraries():
  """As every entry point does (after pytest's own hooks): drops the tensorstore callbacks into
  the closed event loop of a failed orbax save or restore, shown otherwise as warnings."""
  from mian_jax import cli  # noqa: PLC0415

  cli.quiet_library_logs()
