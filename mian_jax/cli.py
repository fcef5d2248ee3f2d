"""What the entry points share: one-line errors for bad flags and bad input, JAX setup."""

from __future__ import annotations

import os
import sys

import jax
from absl import flags, logging

from mian_jax.errors import MianError


def _one_line(e: BaseException) -> str:
  """The message of `e` on one line (KeyError's repr quoting removed)."""
  text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
  return " ".join(text.split())


def parse_flags(argv: list[str]) -> list[str]:
  """absl flags parser that reports bad flags and config overrides in one line (exit 2)."""
  try:
    argv = flags.FLAGS(argv)
    if "config" in flags.FLAGS and flags.FLAGS["config"].present:
      flags.FLAGS.config.keys()  # a config file that failed to load raises here
    return argv
  except flags.Error as e:
    text = str(e)
    if "Traceback" in text:  # an exception inside get_config(arg): keep flag and last line
      lines = [line.strip() for line in text.splitlines() if line.strip()]
      text = f"{text.split(': ', 1)[0]}: {lines[-1]}"
    sys.exit(f"error: {' '.join(text.split())}")
  except (KeyError, AttributeError) as e:  # misspelt --config.<key>
    sys.exit(f"error: unknown config key {_one_line(e)}")
  except OSError as e:  # config file missing or broken
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    sys.exit(f"error: cannot load the config file: {lines[-1] if lines else e}")
  except (ValueError, TypeError, SyntaxError) as e:  # get_config(arg) rejected its argument
    sys.exit(f"error: {type(e).__name__}: {_one_line(e)}")


def run_or_exit(fn, *args):
  """Runs `fn(*args)`, turning user errors (MianError) into a one-line message and exit 1."""
  try:
    return fn(*args)
  except MianError as e:
    logging.error("%s", _one_line(e))
    sys.exit(f"error: {_one_line(e)}")


class _QuietLibraries:
  """Drops INFO lines from orbax, which logs every step of every save."""

  def filter(self, record) -> bool:
    return record.levelno > 20 or "/orbax/" not in record.pathname


def setup_jax() -> None:
  """Process-wide JAX and logging settings; entry points call this, library modules never do."""
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if os.environ.get("MIAN_JAX_DISTRIBUTED") == "1":  # multi-host, see launch/multihost.sh
    kwargs = {}
    if "MIAN_JAX_COORDINATOR" in os.environ:
      kwargs = dict(coordinator_address=os.environ["MIAN_JAX_COORDINATOR"],
                    num_processes=int(os.environ["MIAN_JAX_NUM_PROCESSES"]),
                    process_id=int(os.environ["MIAN_JAX_PROCESS_ID"]))
    jax.distributed.initialize(**kwargs)  # without kwargs: auto-detected (SLURM, TPU, ...)
  cache = os.environ.get("MIAN_JAX_COMPILATION_CACHE")
  if cache is None:
    from mian_jax import data  # noqa: PLC0415 - avoid importing data code at module load
    cache = os.path.join(data.cache_root(), "jax_compilation_cache")
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
