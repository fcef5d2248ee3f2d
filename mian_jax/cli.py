"""What the entry points share: one-line errors for bad flags and bad input, --show_config,
JAX setup."""

from __future__ import annotations

import ast
import difflib
import io
import logging as py_logging
import os
import re
import sys
import tokenize
import traceback
from collections.abc import Sequence

import jax
from absl import app, flags, logging
from flax import traverse_util
from ml_collections import ConfigDict

from mian_jax import config_defaults, fileio
from mian_jax.errors import (ConfigError, MianError, file_system_error, file_system_message,
                             one_line, usage_error)

flags.DEFINE_bool(
    "show_config", False,
    "Print every config key with its value and its comment from the config source, then exit "
    "without running. Any key can be set with --config.<key>=<value> (e.g. "
    "--config.train.batch_size=256); such overrides are applied before printing.")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, a bad flag or override a one-line error (exit 2); answers --show_config."""
  # --help lists the main module's key flags; make --show_config one of them.
  flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS["show_config"])
  try:
    try:
      argv = flags.FLAGS(argv)
    except flags.IllegalFlagValueError:  # a validator failed (a required --workdir left out)
      if not (flags.FLAGS.is_parsed() and flags.FLAGS.show_config and _has_config()):
        raise
    if _has_config():
      flags.FLAGS.config.keys()  # a config file that failed to load raises here
  except flags.Error as e:
    text = str(e)
    if "Traceback" in text:  # an exception inside get_config(arg): keep flag and last line
      text = f"{text.split(': ', 1)[0]}: {text.strip().splitlines()[-1].strip()}"
    usage_error(text)
  except (KeyError, AttributeError) as e:  # misspelt --config.<key>
    usage_error(_unknown_key_message(argv) or f"unknown config key {one_line(e)}")
  except OSError as e:  # config file missing or broken
    last = (str(e).strip() or type(e).__name__).splitlines()[-1].strip()
    usage_error(f"cannot load the config file: {last}")
  except SyntaxError as e:  # a config file that is not valid Python
    where = f"{e.filename} line {e.lineno}" if e.filename else "the config file"
    usage_error(f"{where}: SyntaxError: {e.msg}")
  except (ValueError, TypeError) as e:  # get_config(arg) rejected its argument
    usage_error(f"{type(e).__name__}: {one_line(e)}")
  if flags.FLAGS.show_config:
    if not _has_config():
      usage_error("--show_config needs --config=<config file>")
    try:
      sys.stdout.write(describe_config(flags.FLAGS.config, flags.FLAGS["config"].config_filename))
      sys.stdout.flush()
    except BrokenPipeError:  # `--show_config | head`
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)
  return argv


def flag_value(argv: Sequence[str], name: str) -> str | None:
  """The value of `--name=v` or `--name v` (or `-name`) in argv, the last one given, else None."""
  value = None
  for i, arg in enumerate(argv):
    if match := re.fullmatch(rf"--?{name}=(.*)", arg):
      value = match.group(1)
    elif re.fullmatch(rf"--?{name}", arg) and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def define_checkpoint_flags(verb: str, workdir_help: str = "holds checkpoints/") -> None:
  """--workdir and --step, for the commands that read a checkpoint of a training run."""
  flags.DEFINE_string("workdir", None, f"Workdir of a training run ({workdir_help}).")
  flags.DEFINE_string("step", "latest", f"Checkpoint to {verb}: latest, best (of validation "
                      "AUC) or a step number.")


def check_one_process(command: str) -> None:
  """ConfigError in a multi-process run, for a command that runs in one process."""
  if jax.process_count() > 1:
    raise ConfigError(f"{command} runs in one process; start it without MIAN_JAX_DISTRIBUTED")


def require_run(argv: Sequence[str]) -> None:
  """For commands that read a trained run: --workdir without --config (after
  `workdir.with_recorded_config`: none recorded) exits with `error: no run in WORKDIR` (2)."""
  if flag_value(argv[1:], "config") is None and (workdir := flag_value(argv[1:], "workdir")):
    state = "does not exist" if not os.path.exists(workdir) else "holds no config.json"
    usage_error(f"no run in {workdir} (it {state}); pass the --workdir of a training run "
          "(python -m mian_jax.main --config=... --workdir=...)")


def _has_config() -> bool:
  return ("config" in flags.FLAGS and flags.FLAGS["config"].present
          and flags.FLAGS["config"].value is not None)


def _unknown_key_message(argv: Sequence[str]) -> str | None:
  """'unknown config key a.b (did you mean a.c?)' for the first --config.<key> the config lacks,
  matched whole (ml_collections suggests one part); None if none or the config does not load."""
  args = flags.FLAGS.read_flags_from_files(list(argv[1:]), force_gnu=False)
  try:
    keys = list(flatten(flags.FLAGS["config"].parser.parse(flag_value(args, "config")).to_dict()))
  except Exception:  # noqa: BLE001 - only the original error is worth reporting
    return None
  for arg in args:
    match = re.match(r"--?(?:no)?config\.([^=]+)", arg)
    key = match.group(1) if match else None
    if key and not any(k == key or k.startswith(f"{key}.") for k in keys):
      close = difflib.get_close_matches(key, keys, n=1, cutoff=0.8)
      return f"unknown config key {key}" + (f" (did you mean {close[0]}?)" if close else "")
  return None


def describe_config(config: ConfigDict, name: str) -> str:
  """Every key of `config` (loaded from `name`, path[:arg]) with its value and comment (from
  config_defaults.py and the config file, the latter winning), one aligned line each."""
  comments = {key: comment for path in (config_defaults.__file__, name.split(":", 1)[0])
              if path.endswith(".py") and os.path.isfile(path)
              for key, comment in config_comments(path).items()}
  rows = [(key, repr(value), comments.get(key, ""))
          for key, value in flatten(config.to_dict()).items()]
  key_width = max((len(key) for key, _, _ in rows), default=0)
  value_width = max((len(value) for _, value, _ in rows if len(value) <= 20), default=0)
  lines = [f"# {name}: {len(rows)} keys; set one with --config.<key>=<value>"]
  for i, (key, value, comment) in enumerate(rows):
    if i and key.split(".")[0] != rows[i - 1][0].split(".")[0]:
      lines.append("")
    line = f"{key:<{key_width}}  {value:<{value_width}}"
    lines.append(f"{line}  # {comment}" if comment else line.rstrip())
  return "\n".join(lines) + "\n"


def flatten(tree: dict) -> dict:
  """{"a": {"b": 1}} -> {"a.b": 1}."""
  return traverse_util.flatten_dict(tree, sep=".")


def config_comments(path: str) -> dict[str, str]:
  """Dotted config key -> comment (the trailing `# ...` of the line that sets it, else the
  comment lines right above), from a config file read with tokenize and ast, never run. A
  function's returned name and a parameter `config` stand for the config; aliases
  (`s = config.data.x = ConfigDict()`) and builders (`config.data.g = get_g()`) are followed."""
  with tokenize.open(path) as f:
    source = f.read()
  trailing, alone = {}, {}  # line -> a comment after code, a comment on a line of its own
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT:
      lines = trailing if token.line[:token.start[1]].strip() else alone
      lines[token.start[0]] = token.string.lstrip("#").strip()
  functions = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)]
  prefixes: dict[str, str] = {}  # function -> where its returned config lands
  for _ in range(3):  # a builder defined before its caller, nested builders
    found = []  # (rank: trailing 0, above 1; order; key; comment)
    for function in functions:
      names = {n.value.id: prefixes.get(function.name, "") for n in ast.walk(function)
               if isinstance(n, ast.Return) and isinstance(n.value, ast.Name)}
      if "config" in [a.arg for a in function.args.args]:
        names["config"] = ""
      for statement in sorted((n for n in ast.walk(function)
                               if isinstance(n, (ast.Assign, ast.AnnAssign))),
                              key=lambda n: n.lineno):  # aliases first
        targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
        keys = [_key(t, names) for t in [*targets, statement.value]]
        alias = next((k for k in keys if k is not None), None)  # what a name target stands for
        for target, key in zip(targets, keys):
          if isinstance(target, ast.Name) and alias is not None:
            names.setdefault(target.id, alias)
          elif key:
            if isinstance(statement.value, ast.Call):
              prefixes[getattr(statement.value.func, "id", "")] = key  # a builder's config
            first, above = statement.lineno, statement.lineno
            while above - 1 in alone:  # the block of comment lines right above, to a blank line
              above -= 1
            comment = next((trailing[i] for i in range(first, statement.end_lineno + 1)
                            if i in trailing), None)
            found.append((0, len(found), key, comment) if comment else
                         (1, len(found), key, " ".join(alone[i] for i in range(above, first))))
  return {key: comment for _, _, key, comment in sorted(found, reverse=True) if comment}


def _key(node: ast.expr, names: dict[str, str]) -> str | None:
  """The key `<name>.a.b` stands for (`names`: <name> -> its key), else None."""
  attributes = []
  while isinstance(node, ast.Attribute):
    attributes.append(node.attr)
    node = node.value
  if not isinstance(node, ast.Name) or node.id not in names:
    return None
  return ".".join(filter(None, [names[node.id], *reversed(attributes)]))


# What a collective's transport says when the process at the other end died.
_LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")


def run_or_exit(fn, *args):
  """`fn(*args)`, a user error (MianError), a full or read-only disk or a lost peer (a JAX
  runtime error of a multi-process run whose peer went away) one line on stderr and exit 1."""
  try:
    return fn(*args)
  except MianError as e:
    message = one_line(e)
  except Exception as e:  # noqa: BLE001 - only file-system errors and lost peers answered here
    if (type(e).__name__ == "JaxRuntimeError" and jax.process_count() > 1
        and any(text in str(e) for text in _LOST_PEER)):
      message = ("another process of this distributed run is gone (a collective lost its peer: "
                 f"{one_line(e)[:160]}); the launcher names the process that ended; rerun to "
                 "resume from the last checkpoint")
    elif (os_error := file_system_error(e)) is not None:
      message = " ".join(file_system_message(os_error).split())
    else:
      raise
  if logging.get_absl_handler().python_handler.stream is not sys.stderr:
    logging.error("%s", message)  # also in the log where the log is not stderr
  sys.exit(f"error: {message}")


def _quiet_libraries(record) -> bool:
  """A log filter: drops orbax's INFO lines and the full or read-only disk tracebacks of orbax and
  asyncio (`run_or_exit` says it in one line)."""
  from_orbax = "/orbax/" in record.pathname
  if ((from_orbax or record.name == "asyncio") and record.exc_info
      and file_system_error(record.exc_info[1]) is not None):
    return False
  return record.levelno > 20 or not from_orbax


def _no_backend_probes(record) -> bool:
  """A log filter: drops JAX's INFO lines "Unable to initialize backend 'tpu'" and the like."""
  return not (record.levelno <= py_logging.INFO
              and record.getMessage().startswith("Unable to initialize backend"))


def init_process(argv: Sequence[str] = ()) -> None:
  """First call of every entry point: no stray arguments, quiet logs, distributed, compile cache."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_library_logs()
  init_distributed()
  # Compiled programs persist in $MIAN_JAX_COMPILATION_CACHE (default: in the cache; "": off).
  cache = os.environ.get("MIAN_JAX_COMPILATION_CACHE",
                         os.path.join(fileio.cache_root(), "jax_compilation_cache"))
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _closed_loop_callback(unraisable) -> bool:
  """Whether an unraisable exception is tensorstore calling back into the event loop of an
  orbax save that failed and closed it (no object, asyncio frames only): noise after the error."""
  e, tb = unraisable.exc_value, unraisable.exc_traceback
  frames = [f.f_code.co_filename for f, _ in traceback.walk_tb(tb)]
  return (unraisable.object is None and isinstance(e, RuntimeError)
          and str(e) == "Event loop is closed" and all("asyncio" in f for f in frames))


def quiet_library_logs() -> None:
  logging.get_absl_handler().addFilter(_quiet_libraries)  # a second addFilter is a no-op
  py_logging.getLogger("jax._src.xla_bridge").addFilter(_no_backend_probes)
  if not getattr(sys.unraisablehook, "mian_jax", False):
    previous = sys.unraisablehook

    def hook(unraisable):  # printed by the interpreter, not logged: no log filter sees it
      if not _closed_loop_callback(unraisable):
        previous(unraisable)

    hook.mian_jax = True
    sys.unraisablehook = hook


def init_distributed() -> None:
  """`jax.distributed.initialize` when MIAN_JAX_DISTRIBUTED=1, from MIAN_JAX_COORDINATOR /
  _NUM_PROCESSES / _PROCESS_ID where given, else auto-detected (SLURM, TPU)."""
  if os.environ.get("MIAN_JAX_DISTRIBUTED") != "1":
    return
  kwargs = {}
  if "MIAN_JAX_COORDINATOR" in os.environ:
    kwargs = dict(coordinator_address=os.environ["MIAN_JAX_COORDINATOR"],
                  num_processes=int(os.environ["MIAN_JAX_NUM_PROCESSES"]),
                  process_id=int(os.environ["MIAN_JAX_PROCESS_ID"]))
  jax.distributed.initialize(**kwargs)
