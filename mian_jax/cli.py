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
from collections.abc import Sequence

import jax
from absl import app, flags, logging
from ml_collections import ConfigDict

from mian_jax import config_defaults, fileio
from mian_jax.errors import MianError, file_system_error, file_system_message, one_line

flags.DEFINE_bool(
    "show_config", False,
    "Print every config key with its value and its comment from the config source, then exit "
    "without running. Any key can be set with --config.<key>=<value> (e.g. "
    "--config.train.batch_size=256); such overrides are applied before printing.")


def _fail(message: str) -> None:
  """Exits with `error: <message>` on one line and status 2 (a usage error)."""
  print(f"error: {' '.join(message.split())}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, a bad flag or override a one-line error (exit 2); answers --show_config."""
  # --help lists the main module's key flags; make --show_config one of them.
  flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS["show_config"])
  try:
    try:
      argv = flags.FLAGS(argv)
    except flags.IllegalFlagValueError:
      # All flags were parsed and a validator failed (a required --workdir left out): that is
      # no obstacle to showing the config.
      if not (flags.FLAGS.is_parsed() and flags.FLAGS.show_config and _has_config()):
        raise
    if _has_config():
      flags.FLAGS.config.keys()  # a config file that failed to load raises here
  except flags.Error as e:
    text = str(e)
    if "Traceback" in text:  # an exception inside get_config(arg): keep flag and last line
      lines = [line.strip() for line in text.splitlines() if line.strip()]
      text = f"{text.split(': ', 1)[0]}: {lines[-1]}"
    _fail(text)
  except (KeyError, AttributeError) as e:  # misspelt --config.<key>
    _fail(_unknown_key_message(argv) or f"unknown config key {one_line(e)}")
  except OSError as e:  # config file missing or broken
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    _fail(f"cannot load the config file: {lines[-1] if lines else e}")
  except SyntaxError as e:  # a config file that is not valid Python
    where = f"{e.filename} line {e.lineno}" if e.filename else "the config file"
    _fail(f"{where}: SyntaxError: {e.msg}")
  except (ValueError, TypeError) as e:  # get_config(arg) rejected its argument
    _fail(f"{type(e).__name__}: {one_line(e)}")
  if flags.FLAGS.show_config:
    if not _has_config():
      _fail("--show_config needs --config=<config file>")
    name = flags.FLAGS["config"].config_filename  # path[:arg]
    try:
      sys.stdout.write(describe_config(flags.FLAGS.config, name,
                                       [config_defaults.__file__, name.split(":", 1)[0]]))
      sys.stdout.flush()
    except BrokenPipeError:  # `--show_config | head`
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)
  return argv


def flag_value(argv: Sequence[str], name: str) -> str | None:
  """The value of `--name=v` or `--name v` in argv (the last one given), else None."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def require_run(argv: Sequence[str]) -> None:
  """For commands that read a trained run: --workdir without --config (after
  `workdir.with_recorded_config`: none recorded) exits with `error: no run in WORKDIR` (2)."""
  args = list(argv[1:])
  if any(a in ("--config", "-config") or a.startswith(("--config=", "-config=")) for a in args):
    return
  if workdir := flag_value(args, "workdir"):
    state = "does not exist" if not os.path.exists(workdir) else "holds no config.json"
    _fail(f"no run in {workdir} (it {state}); pass the --workdir of a training run "
          "(python -m mian_jax.main --config=... --workdir=...)")


def _has_config() -> bool:
  return ("config" in flags.FLAGS and flags.FLAGS["config"].present
          and flags.FLAGS["config"].value is not None)


def _unknown_key_message(argv: Sequence[str]) -> str | None:
  """'unknown config key a.b (did you mean a.c?)' for the first --config.<key> the config lacks
  (ml_collections suggests only the first wrong part); None if none or the config won't load."""
  args = flags.FLAGS.read_flags_from_files(list(argv[1:]), force_gnu=False)
  config_arg, keys = None, []
  for i, arg in enumerate(args):
    if match := re.fullmatch(r"--?config(=(.*))?", arg):
      config_arg = match.group(2) if match.group(1) else next(iter(args[i + 1:i + 2]), None)
    elif match := re.match(r"--?(?:no)?config\.([^=]+)", arg):
      keys.append(match.group(1))
  if config_arg is None:
    return None
  try:
    config = flags.FLAGS["config"].parser.parse(config_arg)
  except Exception:  # noqa: BLE001 - only the original error is worth reporting
    return None
  for key in keys:
    if (suggestion := _closest_key(config, key)) != key:
      return f"unknown config key {key}" + (f" (did you mean {suggestion}?)" if suggestion else "")
  return None


def _closest_key(config, key: str) -> str | None:
  """`key`, else the existing dotted key nearest to it part by part (None: a part matches none)."""
  node, found = config, []
  for part in key.split("."):
    if not isinstance(node, ConfigDict):
      return None
    if part not in node:
      part = next(iter(difflib.get_close_matches(part, list(node.keys()), n=1)), None)
      if part is None:
        return None
    found.append(part)
    node = node[part]
  return ".".join(found)


def describe_config(config: ConfigDict, name: str, sources: Sequence[str]) -> str:
  """Every key of `config` (loaded from `name`) with its value and comment (`config_comments`
  of the `sources`, a later one's winning), one aligned line each."""
  comments = {}
  for path in sources:
    if path.endswith(".py") and os.path.isfile(path):
      comments.update(config_comments(path))
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


def flatten(tree: dict, prefix: str = "") -> dict:
  """{"a": {"b": 1}} -> {"a.b": 1}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def config_comments(path: str) -> dict[str, str]:
  """Dotted config key -> comment (the trailing `# ...` of the line that sets it, else the
  comment lines right above), from a config file read with tokenize and ast, never run.

  A function's returned name and a parameter `config` stand for the config; aliases
  (`s = config.data.x = ConfigDict()`) and builders (`config.data.g = get_g()`) are followed.
  """
  with tokenize.open(path) as f:
    source = f.read()
  trailing, above = {}, {}
  block: list[str] = []
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT:
      text = token.string.lstrip("#").strip()
      if token.line[:token.start[1]].strip():
        trailing[token.start[0]] = text
      else:
        block.append(text)
    elif token.type == tokenize.NL and not token.line.strip():
      block = []  # a blank line ends a comment block
    elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
      if block:
        above[token.start[0]] = " ".join(block)
      block = []

  functions = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)]
  prefixes: dict[str, str] = {}  # function -> where its returned config lands
  calls = []  # (caller, callee, key under the caller's config)
  assignments = []  # (function, key under its config, first line, last line)
  for function in functions:
    statements = [(n, n.targets if isinstance(n, ast.Assign) else [n.target])
                  for n in ast.walk(function) if isinstance(n, (ast.Assign, ast.AnnAssign))]
    names = {n.value.id: "" for n in ast.walk(function)
             if isinstance(n, ast.Return) and isinstance(n.value, ast.Name)}
    if "config" in [a.arg for a in function.args.args]:
      names["config"] = ""
    for _ in range(3):  # aliases of aliases
      for statement, targets in statements:
        keys = [_key(t, names) for t in [*targets, statement.value]]
        key = next((k for k in keys if k is not None), None)
        if key is not None:
          for target in targets:
            if isinstance(target, ast.Name):
              names.setdefault(target.id, key)
    for statement, targets in statements:
      for target in targets:
        key = _key(target, names)
        if key:
          assignments.append((function.name, key, statement.lineno, statement.end_lineno))
          if isinstance(statement.value, ast.Call):
            callee = statement.value.func
            name = callee.id if isinstance(callee, ast.Name) else getattr(callee, "attr", None)
            if name in {f.name for f in functions}:
              calls.append((function.name, name, key))
  for _ in range(3):  # nested builders
    for caller, callee, key in calls:
      prefixes[callee] = _join(prefixes.get(caller, ""), key)

  found: dict[str, tuple[int, str]] = {}  # key -> (rank: trailing 0, above 1; comment)
  for function, key, first, last in assignments:
    key = _join(prefixes.get(function, ""), key)
    comment = next((trailing[i] for i in range(first, last + 1) if i in trailing), None)
    candidate = (0, comment) if comment else (1, above.get(first)) if first in above else None
    if candidate and (key not in found or candidate[0] < found[key][0]):
      found[key] = candidate
  return {key: comment for key, (_, comment) in found.items()}


def _key(node: ast.expr, names: dict[str, str]) -> str | None:
  """The key `<name>.a.b` stands for (`names`: <name> -> its key), else None."""
  attributes = []
  while isinstance(node, ast.Attribute):
    attributes.append(node.attr)
    node = node.value
  if not isinstance(node, ast.Name) or node.id not in names:
    return None
  return _join(names[node.id], ".".join(reversed(attributes)))


def _join(prefix: str, key: str) -> str:
  return f"{prefix}.{key}" if prefix and key else prefix or key


def run_or_exit(fn, *args):
  """`fn(*args)`, a user error (MianError), a full or read-only disk or a lost peer becoming a
  one-line message and exit 1."""
  try:
    return fn(*args)
  except MianError as e:
    _exit_with(one_line(e))
  except Exception as e:  # noqa: BLE001 - only file-system errors and lost peers answered here
    if lost_peer(e):
      _exit_with("another process of this distributed run is gone (a collective lost its peer: "
                 f"{one_line(e)[:160]}); the launcher names the process that ended; rerun to "
                 "resume from the last checkpoint")
    os_error = file_system_error(e)
    if os_error is None:
      raise
    _exit_with(" ".join(file_system_message(os_error).split()))


# What a collective's transport says when the process at the other end died.
_LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")


def lost_peer(error: BaseException) -> bool:
  """Whether `error` is a JAX runtime error of a multi-process run whose peer went away."""
  return (type(error).__name__ == "JaxRuntimeError" and jax.process_count() > 1
          and any(text in str(error) for text in _LOST_PEER))


def _exit_with(message: str) -> None:
  """`error: <message>` on stderr, exit status 1; logged too where the log is not stderr."""
  if logging.get_absl_handler().python_handler.stream is not sys.stderr:
    logging.error("%s", message)
  sys.exit(f"error: {message}")


def _quiet_libraries(record) -> bool:
  """A log filter: drops orbax's INFO lines (every step of every save), and the tracebacks of a
  full or read-only disk that orbax or asyncio log (`run_or_exit` reports it in one line)."""
  from_orbax = "/orbax/" in record.pathname
  if not (from_orbax or record.name == "asyncio"):
    return True
  if record.exc_info and file_system_error(record.exc_info[1]) is not None:
    return False
  return record.levelno > 20 or not from_orbax


def _no_backend_probes(record) -> bool:
  """A log filter: drops JAX's INFO lines about backends it probed and skipped ("Unable to
  initialize backend 'tpu'" on every machine without a TPU); warnings and errors stay."""
  return not (record.levelno <= py_logging.INFO
              and record.getMessage().startswith("Unable to initialize backend"))


def init_process(argv: Sequence[str] = ()) -> None:
  """What every entry point does first: refuses arguments besides the flags, quiets library
  logs, joins a multi-process run when asked to, turns on the compilation cache."""
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


def quiet_library_logs() -> None:
  logging.get_absl_handler().addFilter(_quiet_libraries)  # a second addFilter is a no-op
  py_logging.getLogger("jax._src.xla_bridge").addFilter(_no_backend_probes)


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
