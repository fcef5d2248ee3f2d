"""The fault suite (issue 23): small faults and bad inputs thrown at the real entry points, each
outcome classified automatically.

  python -m benchmarks.faults --out=runs/faults [--only=REGEX] [--jobs=2] [--keep] [--list]

Every probe runs an entry point as a subprocess (`python -m mian_jax.main`, `evaluate`,
`predict`, `export`, `prepare`, `launch.local`, `launch.sweep`, `launch/multihost.sh`, or a
short script calling `mian_jax.serving.Scorer`) on the small tabular config (configs/tabular.py,
a generated 300-row click log), in its own directory, with a timeout. One run trained for 12
steps, its export and its predict scores are made once and copied into the probes that need
them. Each probe has its own data cache (a copy of the base run's prepared data) and all share
one compilation cache.

A probe says what a user should get (its `Expect`): a success (with, where known, the right
answer), a one-line error (with words it must contain), a warning or the right answer, either
a success or a one-line error, or a stop with a given exit status (signals). `classify` turns
what happened into one outcome, the worst first:

  hang                 no exit within the timeout, or processes left running after the exit
  run lost             files of a finished run (checkpoints, eval, config, metrics) changed
  raw traceback        a Python traceback was printed
  silent wrong answer  exit 0 where an error or warning was due, or a wrong value
  unclear error        a failure without one readable last line (a crash, an empty line)
  misleading error     a one-line error that does not say what the fault is
  clear error          non-zero exit, one readable last line, no traceback
  correct              the expected success (and answer), warning or stop
  skipped              the fault could not be set up here (e.g. mount refused), with why

Writes `<out>/faults.md` (counts per outcome, one row per probe), `<out>/faults.json` and
`<out>/logs/<probe>.<k>.out|.err` (the k-th subprocess's stdout and stderr). Probes run
`--jobs` at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import functools
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from absl import flags

from benchmarks import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
TABULAR_CONFIG = os.path.join(ROOT, "configs", "tabular.py")
# As tests/conftest.py: the tiny programs spend far longer compiling than running.
XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"

HANG, LOST, TRACEBACK = "hang", "run lost", "raw traceback"
SILENT, UNCLEAR, MISLEADING = "silent wrong answer", "unclear error", "misleading error"
CLEAR, CORRECT, SKIPPED = "clear error", "correct", "skipped"
OUTCOMES = (HANG, LOST, TRACEBACK, SILENT, UNCLEAR, MISLEADING, CLEAR, CORRECT, SKIPPED)
TRACEBACK_MARK = "Traceback (most recent call last)"
MAX_MESSAGE_CHARS = 500  # a last line longer than this is not "one readable line"
MATCH_LINES = 3  # an error's words may be in the last lines (a launcher ends with a summary)
STEP_LINE = re.compile(r"step \d+/\d+ \| loss")  # train.py's progress line

HEADER = ["user_id", "ts", "clicked", "item_id", "category", "price", "age_group", "gender",
          "city", "hour", "device"]
NUM_ROWS = 300
T0 = 1_600_000_000
MODEL = ["--config.data.max_seq_len=5", "--config.model.embed_dim=4", "--config.model.num_heads=2",
         "--config.model.gim_dim=8", "--config.model.mlp_dims=(8,4)",
         "--config.train.batch_size=16", "--config.train.learning_rate=0.03",
         "--config.eval.batch_size=64"]
DATA = ["--config.data.tabular.path=log.csv"]
# The shared run: 12 steps, checkpoints at 6 and 12, validation at 6 and 12.
BASE_STEPS = ["--config.train.num_train_steps=12", "--config.train.log_every_steps=6",
              "--config.train.eval_every_steps=6", "--config.checkpoint.every_steps=6"]
# A run that trains until it is stopped (signals, launchers).
LONG_STEPS = ["--config.train.num_train_steps=1000000", "--config.train.log_every_steps=2",
              "--config.train.eval_every_steps=1000000",
              "--config.checkpoint.every_steps=1000000"]


def tabular_flags(*extra: str, config: bool = True) -> list[str]:
  """--config=configs/tabular.py (unless not `config`) with the tiny model, log.csv, `extra`."""
  return [f"--config={TABULAR_CONFIG}"] * config + DATA + MODEL + list(extra)


# ---------------------------------------------------------------------------------- outcomes


@dataclasses.dataclass
class Proc:
  """What one subprocess did. returncode None: killed at its timeout."""
  returncode: int | None
  stdout: str = ""
  stderr: str = ""
  seconds: float = 0.0
  orphans: tuple[str, ...] = ()  # processes of its group still running after it exited
  fired: bool = True  # whether its `when` trigger fired (the fault was injected)


@dataclasses.dataclass(frozen=True)
class Expect:
  """What a user should get. kind: "succeed" | "fail" | "warn" | "either" | "stop".
  match: a regex the error line must match (fail, either, stop) or, for warn, stderr must match;
  status: the exit status of a stop (None: any non-zero)."""
  kind: str
  text: str
  match: str = ""
  status: int | None = None


@dataclasses.dataclass
class Observed:
  """A probe's result: its (last) subprocess, what its answer check found wrong (None: right or
  not checked), the protected files it changed, more output to scan for tracebacks, or why it
  was skipped."""
  proc: Proc
  problem: str | None = None
  lost: tuple[str, ...] = ()
  logs: str = ""
  skipped: str = ""


def last_lines(proc: Proc, count: int = 1) -> list[str]:
  """The last `count` non-empty lines of stderr (of stdout when stderr has none)."""
  for text in (proc.stderr, proc.stdout):
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines:
      return lines[-count:]
  return []


def message_line(proc: Proc) -> str:
  """The last non-empty line of stderr (of stdout when stderr has none)."""
  return "".join(last_lines(proc))


def warning_lines(text: str) -> list[str]:
  """Lines of `text` other than absl's INFO lines (whose paths could match anything)."""
  return [line.strip() for line in text.splitlines() if line.strip()
          and not re.match(r"I\d{4} ", line)]


def is_readable(line: str) -> bool:
  """One line a user can read: not empty, not too long, not a crash report."""
  crash = re.match(r"(Fatal Python error|Segmentation fault|Aborted|Killed|\*\*\* )", line)
  return bool(line) and len(line) <= MAX_MESSAGE_CHARS and not crash


def _status_text(code: int) -> str:
  if code < 0:
    with contextlib.suppress(ValueError):
      return f"killed by {signal.Signals(-code).name}"
  return f"exit {code}"


def classify(expect: Expect, seen: Observed) -> tuple[str, str]:
  """(outcome, the message to show) of what a probe saw; OUTCOMES, worst first."""
  p = seen.proc
  line = message_line(p)
  if seen.skipped:
    return SKIPPED, seen.skipped
  if p.returncode is None:
    return HANG, f"no exit after {p.seconds:.0f} s; last line: {line}"
  if p.orphans:
    return HANG, f"{_status_text(p.returncode)}, left running: {'; '.join(p.orphans)}"
  if seen.lost:
    return LOST, f"{len(seen.lost)} files of the run changed or gone, e.g. {seen.lost[0]}"
  if any(TRACEBACK_MARK in text for text in (p.stderr, p.stdout, seen.logs)):
    return TRACEBACK, _traceback_line(p, seen.logs)
  code, clear = p.returncode, is_readable(line) and p.returncode > 0
  tail = last_lines(p, MATCH_LINES)
  matches = not expect.match or any(re.search(expect.match, lin, re.I) for lin in tail)
  if expect.kind == "stop":
    if code != 0 and (expect.status is None or code == expect.status):
      if not clear:
        return UNCLEAR, f"{_status_text(code)}: {line!r}"
      return (SILENT, seen.problem) if seen.problem else (CORRECT, line)
  if code == 0:
    warned = [lin for lin in warning_lines(p.stderr) if re.search(expect.match, lin, re.I)]
    if expect.kind == "warn" and expect.match and warned:
      return CORRECT, "warned: " + warned[0]
    if expect.kind in ("fail", "stop"):
      return SILENT, f"exit 0 ({seen.problem or line})"
    return (SILENT, seen.problem) if seen.problem else (CORRECT, line)
  if not clear:
    return UNCLEAR, f"{_status_text(code)}: {line!r}"
  if expect.kind in ("fail", "either") and not matches:
    return MISLEADING, line
  if expect.kind == "fail" and seen.problem:
    return SILENT, f"{line} (but {seen.problem})"
  return CLEAR, line


def as_expected(expect: Expect, outcome: str) -> bool:
  """Whether `outcome` is what `expect` asks for."""
  wanted = {"succeed": {CORRECT}, "warn": {CORRECT, CLEAR}, "stop": {CORRECT},
            "fail": {CLEAR}, "either": {CORRECT, CLEAR}}[expect.kind]
  return outcome in wanted or outcome == SKIPPED


def _traceback_line(p: Proc, logs: str) -> str:
  """The exception line that ends the first traceback found."""
  for text in (p.stderr, p.stdout, logs):
    if TRACEBACK_MARK in text:
      lines = text[text.index(TRACEBACK_MARK):].splitlines()
      exception = next((lin for lin in lines[1:] if re.match(r"[A-Za-z_][\w.]*(Error|Exception|"
                                                             r"Interrupt|Exit)\b", lin)), "")
      count = text.count(TRACEBACK_MARK)
      return f"{count} traceback{'s' * (count > 1)}; {exception.strip() or lines[-1].strip()}"
  return ""


# --------------------------------------------------------------------------------- processes


def _proc_table() -> list[tuple[int, int, int, str]]:
  """(pid, parent pid, process group, state) of every process."""
  rows = []
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          fields = f.read().rsplit(")", 1)[1].split()
      except OSError:
        continue
      rows.append((int(entry), int(fields[1]), int(fields[2]), fields[0]))
  return rows


def _cmdline(pid: int) -> str:
  try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
  except OSError:
    return "?"


def group_members(pgid: int) -> list[int]:
  """Live (not zombie) processes of process group `pgid`."""
  return [pid for pid, _, group, state in _proc_table() if group == pgid and state != "Z"]


def descendants(pid: int) -> list[int]:
  children: dict[int, list[int]] = {}
  for child, parent, _, _ in _proc_table():
    children.setdefault(parent, []).append(child)
  found, todo = [], [pid]
  while todo:
    kids = children.get(todo.pop(), [])
    found += kids
    todo += kids
  return found


def env_value(pid: int, name: str) -> str | None:
  try:
    with open(f"/proc/{pid}/environ", "rb") as f:
      items = f.read().split(b"\0")
  except OSError:
    return None
  prefix = name.encode() + b"="
  return next((i[len(prefix):].decode() for i in items if i.startswith(prefix)), None)


def _kill_group(pgid: int) -> None:
  with contextlib.suppress(ProcessLookupError, PermissionError):
    os.killpg(pgid, signal.SIGKILL)


_LIVE: set[int] = set()  # process groups of the subprocesses running now


def kill_live_groups() -> None:
  """Kills every probe subprocess still running (the suite itself was interrupted)."""
  for pgid in list(_LIVE):
    _kill_group(pgid)


def run_process(cmd: Sequence[str], cwd: str, env: dict[str, str], timeout: float,
                log_prefix: str, when: Callable[[str], bool] | None = None,
                act: Callable[[subprocess.Popen], None] | None = None,
                then_within: float | None = None) -> Proc:
  """Runs `cmd` in its own process group, output to `<log_prefix>.out/.err`. When `when(output
  so far)` first holds, calls `act(popen)` (a signal, a kill) and from then on allows at most
  `then_within` seconds. A timeout kills the group; processes of the group alive after the
  command exited are orphans (named in the result, then killed)."""
  out_path, err_path = log_prefix + ".out", log_prefix + ".err"
  with open(out_path, "w") as out, open(err_path, "w") as err:
    p = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=out, stderr=err,
                         stdin=subprocess.DEVNULL, start_new_session=True)
  _LIVE.add(p.pid)
  try:
    return _watch(p, timeout, out_path, err_path, when, act, then_within)
  finally:
    _LIVE.discard(p.pid)


def _watch(p: subprocess.Popen, timeout: float, out_path: str, err_path: str, when, act,
           then_within: float | None) -> Proc:
  """run_process's wait: the trigger, the timeout, the orphans."""
  start = time.monotonic()
  deadline, fired = start + timeout, when is None
  while p.poll() is None and time.monotonic() < deadline:
    if not fired and when(_read(out_path) + _read(err_path)):
      fired = True
      act(p)
      if then_within is not None:
        deadline = min(deadline, time.monotonic() + then_within)
    time.sleep(0.2)
  timed_out = p.poll() is None
  orphans: list[str] = []
  if timed_out:
    _kill_group(p.pid)
    p.wait()
  else:
    settle = time.monotonic() + 2.0  # time for a child to finish exiting after its parent
    while group_members(p.pid) and time.monotonic() < settle:
      time.sleep(0.1)
    orphans = [f"pid {pid} {_cmdline(pid)}" for pid in group_members(p.pid)]
    _kill_group(p.pid)
  return Proc(None if timed_out else p.returncode, _read(out_path), _read(err_path),
              time.monotonic() - start, tuple(orphans), fired)


def _read(path: str) -> str:
  try:
    with open(path, errors="replace") as f:
      return f.read()
  except OSError:
    return ""


# ------------------------------------------------------------------------- files and runs


def log_rows(num_rows: int = NUM_ROWS, seed: int = 0, first_item: int = 0,
             num_items: int = 30) -> list[list[str]]:
  """A click log in no particular order: 20 users, `num_items` items; odd items are clicked
  more often; distinct timestamps a minute apart."""
  rng = np.random.default_rng(seed)
  rows = []
  for k in rng.permutation(num_rows):
    user, item = int(rng.integers(0, 20)), first_item + int(rng.integers(0, num_items))
    clicked = int(rng.random() < 0.2 + 0.6 * (item % 2))
    rows.append([f"u{user}", str(T0 + 60 * int(k)), str(clicked), f"i{item}", f"c{item % 5}",
                 f"{item / 10:.1f}", str(user % 3), "FM"[user % 2], f"x{user % 4}",
                 str(k % 24), "web" if k % 3 == 0 else "ios"])
  return rows


def write_csv(path: str, rows: Sequence[Sequence[str]], header: Sequence[str] = HEADER,
              sep: str = ",") -> str:
  with open(path, "w") as f:
    f.write(sep.join(header) + "\n")
    f.writelines(sep.join(row) + "\n" for row in rows)
  return path


def first_rows_per_user(rows: Sequence[Sequence[str]]) -> list[int]:
  """Indices of each user's earliest row (no earlier clicks: an empty history)."""
  seen, first = set(), []
  for i in sorted(range(len(rows)), key=lambda i: int(rows[i][1])):
    if rows[i][0] not in seen:
      seen.add(rows[i][0])
      first.append(i)
  return sorted(first)


def scorer_records(rows: Sequence[Sequence[str]], indices: Sequence[int]) -> dict[str, list]:
  """Raw `Scorer.encode` records of `rows[indices]`, with empty histories."""
  col = {name: [rows[i][HEADER.index(name)] for i in indices] for name in HEADER}
  records = {f"item.{n}": col[n] for n in ("item_id", "category")}
  records["item.price"] = [float(v) for v in col["price"]]
  records.update({f"user.{n}": col[n] for n in ("age_group", "gender", "city")})
  records.update({f"context.{n}": col[n] for n in ("hour", "device")})
  records.update({"hist.item_id": [[] for _ in indices], "hist.category": [[] for _ in indices]})
  return records


SCORE_SCRIPT = """
import json, sys
from mian_jax.serving import Scorer
try:
  scorer = Scorer.load(sys.argv[1])
  batch, unseen = scorer.encode(json.loads(sys.argv[2]))
  prob = scorer.score(batch)["prob"]
except (ValueError, TypeError, OSError) as e:  # the loader's typed errors, caught as a caller would
  print("error: " + " ".join(str(e).split()), file=sys.stderr)
  sys.exit(1)
print(json.dumps({"prob": [float(p) for p in prob], "unseen": unseen}))
"""
ENCODE_SCRIPT = """
import json, sys
from mian_jax.serving import Scorer
try:
  scorer = Scorer.load(sys.argv[1])
  out = [scorer.encode(json.loads(arg))[0] for arg in sys.argv[2:]]
except (ValueError, TypeError, OSError) as e:
  print("error: " + " ".join(str(e).split()), file=sys.stderr)
  sys.exit(1)
print(json.dumps([{k: v.tolist() for k, v in batch.items()} for batch in out]))
"""


METRICS_LOG = os.path.join("metrics", "metrics.jsonl")
TIME_KEYS = ("time", "created")  # when a record was written, not what it says


def _json_records(path: str) -> str:
  """A JSON or JSON-lines file as its records without TIME_KEYS, one per line (a line that is
  not JSON as itself)."""
  records = []
  with open(path, errors="replace") as f:
    for line in (f if path.endswith(".jsonl") else [f.read()]):
      if line.strip():
        try:
          record = json.loads(line)
        except ValueError:
          records.append(line.rstrip("\n") + "\n")
          continue
        if isinstance(record, dict):
          record = {k: v for k, v in record.items() if k not in TIME_KEYS}
        records.append(json.dumps(record, sort_keys=True) + "\n")
  return "".join(records)


def snapshot(workdir: str) -> dict[str, str]:
  """What a run holds, path (relative) -> content: config.json, metrics.jsonl and eval/*.json
  as their records (write times left out), checkpoint files as SHA-256 (in-flight temporary
  checkpoints left out)."""
  import hashlib  # noqa: PLC0415 - only the protected probes hash
  contents = {}
  for name in ("config.json", METRICS_LOG, *glob.glob("eval/*.json", root_dir=workdir)):
    if os.path.isfile(os.path.join(workdir, name)):
      contents[name] = _json_records(os.path.join(workdir, name))
  for sub in ("checkpoints", "checkpoints_best"):
    for path in glob.glob(os.path.join(workdir, sub, "**"), recursive=True):
      if os.path.isfile(path) and "tmp" not in path:
        with open(path, "rb") as f:
          contents[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
  return contents


def changed(before: dict[str, str], after: dict[str, str],
            allowed: Sequence[str] = ()) -> tuple[str, ...]:
  """Files of `before` that are gone or differ in `after` (metrics.jsonl may grow), except
  `allowed` ones."""
  def kept(path: str) -> bool:
    if path == METRICS_LOG:
      return after.get(path, "").startswith(before[path])
    return after.get(path) == before[path]
  return tuple(sorted(p for p in before if p not in allowed and not kept(p)))


def flip_byte(path: str, offset: int = -1) -> None:
  """Inverts one byte of a file (default: the last), keeping its size."""
  with open(path, "r+b") as f:
    f.seek(offset, os.SEEK_END if offset < 0 else os.SEEK_SET)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))


def largest_file(pattern: str) -> str:
  files = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
  return max(files, key=os.path.getsize)


def fill_disk(directory: str, leave_bytes: int) -> None:
  """Writes a filler file into `directory` until about `leave_bytes` are free."""
  free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
  with open(os.path.join(directory, "filler"), "wb") as f, contextlib.suppress(OSError):
    f.write(b"\0" * max(free - leave_bytes, 0))


# -------------------------------------------------------------------------------- contexts


@dataclasses.dataclass
class Base:
  """What probes share: the scratch root, the base directory (log.csv; after `train_base` also
  run/, export/, scores.csv, cache/) and the base run's facts."""
  root: str
  directory: str
  rows: list[list[str]]
  trained: bool = False
  test_auc: float | None = None
  test_metrics: dict = dataclasses.field(default_factory=dict)
  checksum: str | None = None
  loader_indices: list[int] = dataclasses.field(default_factory=list)
  loader_probs: list[float] = dataclasses.field(default_factory=list)
  scores: list[float] = dataclasses.field(default_factory=list)


class Ctx:
  """One probe's directory, environment and subprocess runner (its cwd is the directory)."""

  def __init__(self, base: Base, name: str, log_dir: str):
    self.base, self.name = base, name
    # A short directory: messages quote paths, and a probe's name must not match its regexes.
    self.dir = tempfile.mkdtemp(prefix="p", dir=os.path.join(base.root, "probes"))
    self.log_dir, self.runs, self.mounts = log_dir, 0, []
    prepared = os.path.join(base.directory, "cache", "prepared")
    if os.path.isdir(prepared):
      shutil.copytree(prepared, os.path.join(self.dir, "cache", "prepared"))
    self.copy("log.csv")

  def path(self, *parts: str) -> str:
    return os.path.join(self.dir, *parts)

  def copy(self, name: str, to: str | None = None) -> str:
    """Copies base/<name> (a file or a directory) into this probe's directory."""
    source, target = os.path.join(self.base.directory, name), self.path(to or name)
    if os.path.isdir(source):
      shutil.copytree(source, target)
    else:
      shutil.copy2(source, target)
    return target

  def env(self, **extra: str) -> dict[str, str]:
    return probe_env(self.path("cache"), self.base.root, **extra)

  def run(self, cmd: Sequence[str], timeout: float = 120, env: dict[str, str] | None = None,
          **trigger) -> Proc:
    self.runs += 1
    prefix = os.path.join(self.log_dir, f"{self.name}.{self.runs}")
    return run_process(cmd, self.dir, env or self.env(), timeout, prefix, **trigger)

  def module(self, module: str, *args: str, **kwargs) -> Proc:
    """`python -m <module> <args>` in this probe's directory."""
    return self.run([PYTHON, "-m", module, *args], **kwargs)

  def script(self, text: str, *args: str, **kwargs) -> Proc:
    return self.run([PYTHON, "-c", text, *args], **kwargs)

  def mount(self, directory: str, *options: str) -> str | None:
    """`mount <options> ... directory` (made first); None if it worked, else why not."""
    os.makedirs(directory, exist_ok=True)
    result = subprocess.run(["mount", *options, directory], capture_output=True, text=True)
    if result.returncode:
      return f"mount refused: {(result.stderr or result.stdout).strip()}"
    self.mounts.append(directory)
    return None

  def close(self) -> None:
    for directory in reversed(self.mounts):
      subprocess.run(["umount", "-l", directory], capture_output=True)


def probe_env(cache: str, root: str, **extra: str) -> dict[str, str]:
  """The environment of a subprocess: its own data cache, the shared compilation cache under
  `root`, CPU only, the repository importable, no multi-process settings inherited."""
  env = dict(os.environ, MIAN_JAX_CACHE=cache, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             MIAN_JAX_COMPILATION_CACHE=os.path.join(root, "xla"), XLA_FLAGS=XLA_FLAGS,
             PYTHONUNBUFFERED="1")
  for key in ("MIAN_JAX_DISTRIBUTED", "MIAN_JAX_COORDINATOR", "MIAN_JAX_PROCESS_ID",
              "MIAN_JAX_NUM_PROCESSES", "JAX_NUM_CPU_DEVICES"):
    env.pop(key, None)
  return {**env, **extra}


def run_base(base: Base, log_dir: str) -> None:
  """Trains the shared run (12 steps), exports it, scores log.csv with predict, and scores
  each user's first row with the export's loader; raises if any of them fails."""
  d = base.directory
  env = probe_env(os.path.join(d, "cache"), base.root)
  steps = [
      [PYTHON, "-m", "mian_jax.main", *tabular_flags(*BASE_STEPS), "--workdir=run"],
      [PYTHON, "-m", "mian_jax.export", "--workdir=run", "--out=export", "--platforms=cpu"],
      [PYTHON, "-m", "mian_jax.predict", "--workdir=run", "--input=log.csv",
       "--output=scores.csv"],
  ]
  for k, cmd in enumerate(steps):
    proc = run_process(cmd, d, env, 600, os.path.join(log_dir, f"base.{k}"))
    if proc.returncode != 0:
      raise RuntimeError(f"the base run failed at {' '.join(cmd[2:4])}: {message_line(proc)}")
  import pandas as pd  # noqa: PLC0415 - only the base run reads tables
  base.scores = pd.read_csv(os.path.join(d, "scores.csv"))["score"].tolist()
  with open(os.path.join(d, "run", "eval", "test_metrics.json")) as f:
    base.test_metrics = json.load(f)
  base.test_auc = base.test_metrics["auc"]
  with open(largest_file(os.path.join(d, "cache", "prepared", "*", "stats.json"))) as f:
    base.checksum = json.load(f)["checksum"]
  base.loader_indices = first_rows_per_user(base.rows)
  records = json.dumps(scorer_records(base.rows, base.loader_indices))
  proc = run_process([PYTHON, "-c", SCORE_SCRIPT, "export", records], d, env, 300,
                     os.path.join(log_dir, "base.loader"))
  if proc.returncode != 0:
    raise RuntimeError(f"the export loader failed: {message_line(proc)}")
  base.loader_probs = json.loads(proc.stdout.strip().splitlines()[-1])["prob"]
  base.trained = True


def make_base(root: str) -> Base:
  """The scratch root with base/log.csv written (nothing trained yet)."""
  directory = os.path.join(root, "base")
  os.makedirs(directory)
  os.makedirs(os.path.join(root, "xla"), exist_ok=True)
  os.makedirs(os.path.join(root, "probes"), exist_ok=True)
  rows = log_rows()
  write_csv(os.path.join(directory, "log.csv"), rows)
  return Base(root, directory, rows)


# ----------------------------------------------------------------------------------- probes


@dataclasses.dataclass(frozen=True)
class Probe:
  cls: str
  name: str
  expect: Expect
  fn: Callable[[Ctx], Observed]
  needs_run: bool
  cost: float  # rough seconds, to start the long ones first


PROBES: list[Probe] = []


def probe(cls: str, name: str, kind: str, text: str, match: str = "", status: int | None = None,
          needs_run: bool = False, cost: float = 8):
  def register(fn: Callable[[Ctx], Observed]) -> Callable[[Ctx], Observed]:
    PROBES.append(Probe(cls, name, Expect(kind, text, match, status), fn, needs_run, cost))
    return fn
  return register


def command_probe(cls: str, name: str, kind: str, text: str, match: str, command: Sequence[str],
                  timeout: float = 120, **options) -> None:
  """A probe of one `python -m <command>` (after copying the base run if it needs one)."""
  def run(ctx: Ctx) -> Observed:
    if options.get("needs_run"):
      ctx.copy("run")
    return Observed(ctx.module(*command, timeout=timeout))
  probe(cls, name, kind, text, match, **options)(run)


def _protected(ctx: Ctx, action: Callable[[], Proc], workdir: str = "run",
               allowed: Sequence[str] = ()) -> Observed:
  """Runs `action` and reports the files of `workdir`'s run that it changed (but `allowed`)."""
  before = snapshot(ctx.path(workdir))
  proc = action()
  return Observed(proc, lost=changed(before, snapshot(ctx.path(workdir)), allowed))


def _rows_with(rows: Sequence[Sequence[str]], column: str, value: Callable[[int, str], str]):
  k = HEADER.index(column)
  return [[value(i, v) if j == k else v for j, v in enumerate(row)] for i, row in enumerate(rows)]


def _edit_labels_in_place(path: str, rows, keep_mtime: bool) -> None:
  """Every label set to 1 (the file keeps its size); optionally its mtime restored too."""
  stat = os.stat(path)
  write_csv(path, _rows_with(rows, "clicked", lambda i, v: "1"))
  if keep_mtime:
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _more_items_rows(rows) -> list[list[str]]:
  """The log plus 100 rows of 70 new items inside the training period."""
  extra = log_rows(100, seed=1, first_item=30, num_items=70)
  for k, row in enumerate(extra):
    row[1] = str(T0 + 60 * k + 30)  # between the log's minutes, in its first 100 minutes
  return [*rows, *extra]


def _checksum(proc: Proc) -> str | None:
  match = re.search(r"checksum: ([0-9a-f]{16,})", proc.stdout + proc.stderr)
  return match.group(1) if match else None


def _prepare(ctx: Ctx, *extra: str) -> Proc:
  return ctx.module("mian_jax.prepare", *tabular_flags(*extra))


# --- resume and overwrite of runs


@probe("resume", "resume on other data (new items in training period)", "fail",
       "stops, names the data, run untouched", r"data|checksum|vocab", needs_run=True, cost=40)
def _resume_other_data(ctx: Ctx) -> Observed:
  ctx.copy("run")
  write_csv(ctx.path("more.csv"), _more_items_rows(ctx.base.rows))
  return _protected(ctx, lambda: ctx.module(
      "mian_jax.main", "--workdir=run", "--config.data.tabular.path=more.csv", timeout=180))


@probe("resume", "resume after CSV edited in place and prepared dir deleted", "fail",
       "stops, names the data, run untouched", r"data|checksum|vocab", needs_run=True, cost=40)
def _resume_edited_deleted(ctx: Ctx) -> Observed:
  ctx.copy("run")
  write_csv(ctx.path("log.csv"), _more_items_rows(ctx.base.rows))
  shutil.rmtree(ctx.path("cache", "prepared"))
  return _protected(ctx, lambda: ctx.module("mian_jax.main", "--workdir=run", timeout=180))


def _resume_with(ctx: Ctx, flag: str) -> Observed:
  ctx.copy("run")
  return _protected(ctx, lambda: ctx.module("mian_jax.main", "--workdir=run", flag, timeout=180))


for _what, _key, _value in (("another model config", "model.embed_dim", 8),
                            ("another optimiser setting", "train.learning_rate", 0.5)):
  _name = _key.split(".")[1]
  probe("resume", f"resume with {_what} ({_name})", "fail", f"stops naming {_key}, run untouched",
        _name, needs_run=True)(functools.partial(_resume_with, flag=f"--config.{_key}={_value}"))


@probe("resume", "resume with a damaged latest checkpoint", "succeed",
       "damaged one set aside, resumes from step 6, same test AUC", needs_run=True, cost=40)
def _resume_damaged(ctx: Ctx) -> Observed:
  ctx.copy("run")
  flip_byte(largest_file(ctx.path("run", "checkpoints", "12", "**")), 100)
  proc = ctx.module("mian_jax.main", "--workdir=run", timeout=240)
  problem = None
  if not glob.glob(ctx.path("run", "checkpoints_damaged", "*")):
    problem = "no checkpoints_damaged/"
  elif not os.path.isdir(ctx.path("run", "checkpoints", "12")):
    problem = "no checkpoint 12 after the resume"
  else:
    with open(ctx.path("run", "eval", "test_metrics.json")) as f:
      result = json.load(f)
    want = ctx.base.test_metrics
    if result["step"] != want["step"] or abs(result["auc"] - want["auc"]) > 1e-4:
      problem = (f"test AUC {result['auc']:.4f} at step {result['step']}, was "
                 f"{want['auc']:.4f} at step {want['step']}")
  return Observed(proc, problem)


@probe("resume", "rerun a finished run", "succeed", "exit 0, nothing of the run changed",
       needs_run=True, cost=15)
def _rerun_finished(ctx: Ctx) -> Observed:
  ctx.copy("run")
  return _protected(ctx, lambda: ctx.module("mian_jax.main", "--workdir=run", timeout=180))


@probe("resume", "rerun a finished run with an allowed change (log_every_steps)", "succeed",
       "exit 0, nothing but config.json changed", needs_run=True, cost=15)
def _rerun_allowed(ctx: Ctx) -> Observed:
  ctx.copy("run")
  return _protected(ctx, lambda: ctx.module(
      "mian_jax.main", "--workdir=run", "--config.train.log_every_steps=3", timeout=180),
                    allowed=["config.json"])  # which records the new logging cadence


@probe("resume", "continue a finished run to a larger step budget", "succeed",
       "exit 0, trains on to step 18", needs_run=True, cost=35)
def _continue_budget(ctx: Ctx) -> Observed:
  ctx.copy("run")
  proc = ctx.module("mian_jax.main", "--workdir=run", "--config.train.num_train_steps=18",
                    timeout=240)
  steps = sorted(int(s) for s in os.listdir(ctx.path("run", "checkpoints")) if s.isdigit())
  return Observed(proc, None if steps and steps[-1] == 18 else f"checkpoints {steps}")


@probe("resume", "workdir with a corrupted config.json, no --config", "fail",
       "one line naming config.json, run untouched", r"config\.json", needs_run=True)
def _corrupt_config_json(ctx: Ctx) -> Observed:
  ctx.copy("run")
  with open(ctx.path("run", "config.json"), "a") as f:
    f.write("}{ not json")
  return _protected(ctx, lambda: ctx.module("mian_jax.main", "--workdir=run"))


@probe("resume", "second run on a busy workdir (lock held)", "fail",
       "one line naming the holder, run untouched", r"busy|another|lock|pid", needs_run=True)
def _busy_workdir(ctx: Ctx) -> Observed:
  ctx.copy("run")
  with open(ctx.path("run", ".lock"), "a+") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    lock.write(f"pid {os.getpid()} (the fault suite)\n")
    lock.flush()
    return _protected(ctx, lambda: ctx.module("mian_jax.main", "--workdir=run",
                                              "--config.train.num_train_steps=18"))


@probe("resume", "workdir is a regular file", "fail", "one line naming the workdir",
       r"workdir|directory|not a dir")
def _workdir_is_file(ctx: Ctx) -> Observed:
  with open(ctx.path("run"), "w") as f:
    f.write("not a directory\n")
  return Observed(ctx.module("mian_jax.main", *tabular_flags(*BASE_STEPS), "--workdir=run"))


@probe("resume", "rerun a finished run with a leftover *.orbax-checkpoint-tmp", "succeed",
       "exit 0, nothing of the run changed", needs_run=True, cost=15)
def _leftover_tmp(ctx: Ctx) -> Observed:
  ctx.copy("run")
  shutil.copytree(ctx.path("run", "checkpoints", "12"),
                  ctx.path("run", "checkpoints", "18.orbax-checkpoint-tmp-1234"))
  return _protected(ctx, lambda: ctx.module("mian_jax.main", "--workdir=run", timeout=180))


# --- stale prepared data


def _prepare_edit_prepare(ctx: Ctx, keep_mtime: bool) -> Observed:
  first = _prepare(ctx)
  _edit_labels_in_place(ctx.path("log.csv"), ctx.base.rows, keep_mtime=keep_mtime)
  proc = _prepare(ctx)
  before, after = _checksum(first), _checksum(proc)
  return Observed(proc, f"same checksum {after} as before the edit" if before == after else None)


@probe("stale data", "prepare after the CSV was edited in place (labels)", "succeed",
       "a new checksum", cost=15)
def _prepare_after_edit(ctx: Ctx) -> Observed:
  return _prepare_edit_prepare(ctx, keep_mtime=False)


@probe("stale data", "prepare after an in-place edit keeping size and mtime", "succeed",
       "a new checksum", cost=15)
def _prepare_after_edit_mtime(ctx: Ctx) -> Observed:
  return _prepare_edit_prepare(ctx, keep_mtime=True)


@probe("stale data", "prepare after a pre-split train file was edited in place", "succeed",
       "a new checksum", cost=15)
def _prepare_presplit_edit(ctx: Ctx) -> Observed:
  rows = sorted(ctx.base.rows, key=lambda r: int(r[1]))
  for name, part in (("train", rows[:240]), ("valid", rows[240:270]), ("test", rows[270:])):
    write_csv(ctx.path(f"{name}.csv"), part)
  split = ["--config.data.tabular.path=", *(f"--config.data.tabular.{n}_path={n}.csv"
                                            for n in ("train", "valid", "test"))]
  first = _prepare(ctx, *split)
  _edit_labels_in_place(ctx.path("train.csv"), rows[:240], keep_mtime=False)
  proc = _prepare(ctx, *split)
  before, after = _checksum(first), _checksum(proc)
  return Observed(proc, f"same checksum {after} as before the edit" if before == after else None)


@probe("stale data", "rerun a finished run after its CSV was edited in place", "fail",
       "stops: the data changed; run untouched", r"data|checksum", needs_run=True, cost=20)
def _resume_after_edit(ctx: Ctx) -> Observed:
  ctx.copy("run")
  shutil.rmtree(ctx.path("cache", "prepared"))
  first = _prepare(ctx)  # this directory's prepared data, as the run's own
  if _checksum(first) != ctx.base.checksum:
    return Observed(first, skipped=f"prepare gave {_checksum(first)}, the run had another")
  _edit_labels_in_place(ctx.path("log.csv"), ctx.base.rows, keep_mtime=False)
  return _protected(ctx, lambda: ctx.module("mian_jax.main", "--workdir=run", timeout=180))


@probe("stale data", "evaluate with a tampered prepared split file", "fail",
       "stops: prepared data changed", r"checksum|changed|damaged|modified|differ",
       needs_run=True)
def _tampered_prepared(ctx: Ctx) -> Observed:
  ctx.copy("run")
  for path in glob.glob(ctx.path("cache", "prepared", "*", "test", "item.item_id.npy")):
    ids = np.load(path)
    ids[0] = 2 + (ids[0] == 2)  # another valid id
    np.save(path, ids)
  return Observed(ctx.module("mian_jax.evaluate", "--workdir=run"))


@probe("stale data", "evaluate after the prepared data was deleted", "succeed",
       "prepares again, the same test AUC", needs_run=True, cost=12)
def _prepared_deleted(ctx: Ctx) -> Observed:
  ctx.copy("run")
  shutil.rmtree(ctx.path("cache", "prepared"))
  proc = ctx.module("mian_jax.evaluate", "--workdir=run")
  match = re.search(r"\bauc=([0-9.]+)", proc.stdout + proc.stderr)
  if not match:
    return Observed(proc, "no auc= printed")
  auc = float(match.group(1))
  return Observed(proc, None if abs(auc - ctx.base.test_auc) < 1e-3 else
                  f"AUC {auc} instead of {ctx.base.test_auc:.4f}")


# --- launchers


def _kill_rank(rank: int) -> Callable[[subprocess.Popen], None]:
  def act(p: subprocess.Popen) -> None:
    for pid in descendants(p.pid):
      if env_value(pid, "MIAN_JAX_PROCESS_ID") == str(rank) and "python" in _cmdline(pid):
        os.kill(pid, signal.SIGKILL)
        return
  return act


def _step_seen(text: str) -> bool:
  return bool(STEP_LINE.search(text))


@probe("launchers", "launch.local: process 1 killed during training", "fail",
       "stops the others within 45 s, names process 1", r"process 1\b", cost=80)
def _local_rank_dies(ctx: Ctx) -> Observed:
  proc = ctx.module("launch.local", "--num_processes=2", "--cpu_devices_per_process=1", "--",
                    *tabular_flags(*LONG_STEPS), "--workdir=run2", timeout=240,
                    when=_step_seen, act=_kill_rank(1), then_within=45)
  return Observed(proc, None if proc.fired else "training never started")


@probe("launchers", "multihost.sh: coordinator port already in use", "fail",
       "one line about the port within 60 s", r"port|address|in use|bind", cost=60)
def _busy_port(ctx: Ctx) -> Observed:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    env = ctx.env(COORDINATOR=f"127.0.0.1:{port}", NUM_PROCESSES="2", PROCESS_ID="0",
                  PATH=os.path.dirname(PYTHON) + os.pathsep + os.environ.get("PATH", ""))
    proc = ctx.run(["bash", os.path.join(ROOT, "launch", "multihost.sh"),
                    *tabular_flags(*BASE_STEPS), "--workdir=run2"], timeout=60, env=env)
  return Observed(proc)


command_probe("launchers", "launch.local: a misspelt config key in every process", "fail",
              "one line naming the key", r"unknown config key",
              ["launch.local", "--num_processes=2", "--cpu_devices_per_process=1", "--",
               *tabular_flags("--config.train.batchsize=8"), "--workdir=run2"], timeout=90, cost=15)


command_probe("launchers", "launch.local: no entry point arguments", "fail", "usage error",
              r"--|argument", ["launch.local", "--num_processes=2"], cost=3)


command_probe("launchers", "launch.sweep: unknown model", "fail", "one line naming the model",
              r"nosuchmodel|unknown",
              ["launch.sweep", f"--config={TABULAR_CONFIG}", "--models=nosuchmodel", "--seeds=0",
               "--out=sweep", "--", *DATA, *MODEL], cost=6)


# --- signals


def _signal(signum: int, group: bool = False) -> Callable[[subprocess.Popen], None]:
  def act(p: subprocess.Popen) -> None:
    (os.killpg if group else os.kill)(p.pid, signum)
  return act


def _saved_checkpoint(workdir: str) -> str | None:
  """None if `workdir` holds a finished checkpoint and no temporary one, else what is wrong."""
  tmp = glob.glob(os.path.join(workdir, "checkpoints", "*tmp*"))
  if tmp:
    return f"left {os.path.basename(tmp[0])}"
  saved = [s for s in glob.glob(os.path.join(workdir, "checkpoints", "*"))
           if os.path.basename(s).isdigit()]
  return None if saved else "no checkpoint saved"


def _main_signal(ctx: Ctx, signum: int) -> Observed:
  proc = ctx.module("mian_jax.main", *tabular_flags(*LONG_STEPS), "--workdir=run2",
                    timeout=180, when=_step_seen, act=_signal(signum), then_within=60)
  if not proc.fired:
    return Observed(proc, "training never started")
  return Observed(proc, _saved_checkpoint(ctx.path("run2")))


@probe("signals", "SIGINT to mian_jax.main during training", "stop",
       "exit 130 after saving a checkpoint", r"SIGINT", status=130, cost=35)
def _main_sigint(ctx: Ctx) -> Observed:
  return _main_signal(ctx, signal.SIGINT)


@probe("signals", "SIGTERM to mian_jax.main during training", "stop",
       "exit 143 after saving a checkpoint", r"SIGTERM", status=143, cost=35)
def _main_sigterm(ctx: Ctx) -> Observed:
  return _main_signal(ctx, signal.SIGTERM)


def _sweep_signal(ctx: Ctx, signum: int, group: bool) -> Observed:
  def child_stepping(_: str) -> bool:
    return any(_step_seen(_read(p)) for p in glob.glob(ctx.path("sweep", "**", "log.txt"),
                                                        recursive=True))
  proc = ctx.module("launch.sweep", f"--config={TABULAR_CONFIG}", "--models=mian", "--seeds=0",
                    "--out=sweep", "--", *DATA, *MODEL, *LONG_STEPS, timeout=240,
                    when=child_stepping, act=_signal(signum, group), then_within=60)
  logs = glob.glob(ctx.path("sweep", "**", "log.txt"), recursive=True)
  if not proc.fired or not logs:
    return Observed(proc, "training never started")
  return Observed(proc, _saved_checkpoint(os.path.dirname(logs[0])), logs=_read(logs[0]))


def _local_signal(ctx: Ctx, signum: int, group: bool) -> Observed:
  proc = ctx.module("launch.local", "--num_processes=2", "--cpu_devices_per_process=1", "--",
                    *tabular_flags(*LONG_STEPS), "--workdir=run2", timeout=240,
                    when=_step_seen, act=_signal(signum, group), then_within=60)
  if not proc.fired:
    return Observed(proc, "training never started")
  return Observed(proc, _saved_checkpoint(ctx.path("run2")))


# Ctrl-C reaches the terminal's whole process group; SIGTERM only the launcher.
for _tool, _run, _saves, _cost in (
    ("launch.sweep", _sweep_signal, "child saves", 50),
    ("launch.local", _local_signal, "processes save", 70)):
  for _how, _signum, _group in (("Ctrl-C (SIGINT to the group) on", signal.SIGINT, True),
                                ("SIGTERM to", signal.SIGTERM, False)):
    probe("signals", f"{_how} {_tool} during training", "stop",
          f"{_saves}, one line, no orphan", cost=_cost)(
              functools.partial(_run, signum=_signum, group=_group))


# --- export artefacts


def _score_export(ctx: Ctx, directory: str = "export", records: dict | None = None) -> Observed:
  """Scores each user's first row with the loader; a success must give the base scores."""
  records = records or scorer_records(ctx.base.rows, ctx.base.loader_indices)
  proc = ctx.script(SCORE_SCRIPT, directory, json.dumps(records))
  if proc.returncode != 0:
    return Observed(proc)
  prob = json.loads(proc.stdout.strip().splitlines()[-1])["prob"]
  diff = float(np.max(np.abs(np.array(prob) - ctx.base.loader_probs)))
  return Observed(proc, f"scores changed by up to {diff:.3g}" if diff > 1e-6 else
                  "scores unchanged")


@probe("export", "loader scores equal predict's (untampered export)", "succeed",
       "the scores predict gave, to 1e-5", needs_run=True)
def _export_ok(ctx: Ctx) -> Observed:
  ctx.copy("export")
  seen = _score_export(ctx)
  if seen.proc.returncode == 0:
    expected = np.array([ctx.base.scores[i] for i in ctx.base.loader_indices])
    diff = float(np.max(np.abs(np.array(ctx.base.loader_probs) - expected)))
    seen.problem = f"differs from predict by {diff:.3g}" if diff > 1e-5 else None
  return seen


TAMPERED = r"sha|checksum|hash|changed|modified|damaged|edited|does not match|missing"


def _tamper_probe(name: str, tamper: Callable[[Ctx], None]) -> None:
  @probe("export", name, "fail", "load refuses, naming the file", TAMPERED, needs_run=True)
  def run(ctx: Ctx) -> Observed:
    ctx.copy("export")
    tamper(ctx)
    return _score_export(ctx)


def _swap_vocab_items(ctx: Ctx) -> None:
  path = ctx.path("export", "vocab", "item.item_id.json")
  with open(path) as f:
    vocab = json.load(f)
  values = vocab["values"]
  a, b = (values.index(ctx.base.rows[i][3]) for i in ctx.base.loader_indices[:2])
  values[a], values[b] = values[b], values[a]
  with open(path, "w") as f:
    json.dump(vocab, f, separators=(",", ":"))


def _edit_encoder_mean(ctx: Ctx) -> None:
  path = ctx.path("export", "vocab", "encoders.json")
  with open(path) as f:
    encoders = json.load(f)
  encoders["fields"]["item.price"]["mean"] += 1.0
  with open(path, "w") as f:
    json.dump(encoders, f, separators=(",", ":"))


def _edit_signature(ctx: Ctx) -> None:
  path = ctx.path("export", "signature.json")
  with open(path) as f:
    sig = json.load(f)
  sig["inputs"][0]["range"][1] -= 5
  with open(path, "w") as f:
    json.dump(sig, f, indent=2)


_tamper_probe("params.npz: one byte flipped",
              lambda ctx: flip_byte(ctx.path("export", "params.npz"), 2000))
_tamper_probe("model.jaxexport: one byte flipped",
              lambda ctx: flip_byte(ctx.path("export", "model.jaxexport"), 3000))
_tamper_probe("vocab: two item ids swapped", _swap_vocab_items)
_tamper_probe("vocab/encoders.json: a mean edited", _edit_encoder_mean)
_tamper_probe("signature.json: an id range edited", _edit_signature)
_tamper_probe("manifest.json deleted", lambda ctx: os.remove(ctx.path("export", "manifest.json")))
_tamper_probe("a vocabulary file deleted",
              lambda ctx: os.remove(ctx.path("export", "vocab", "user.city.json")))


@probe("export", "export into a non-empty directory", "fail",
       "one line, existing files untouched", r"empty|exists|not empty", needs_run=True, cost=10)
def _export_non_empty(ctx: Ctx) -> Observed:
  ctx.copy("run")
  os.makedirs(ctx.path("out"))
  with open(ctx.path("out", "keep.txt"), "w") as f:
    f.write("mine\n")
  proc = ctx.module("mian_jax.export", "--workdir=run", "--out=out", "--platforms=cpu")
  return Observed(proc, None if os.listdir(ctx.path("out")) == ["keep.txt"] else
                  f"out/ now holds {sorted(os.listdir(ctx.path('out')))}")


# --- silent wrong input


@probe("input", "Scorer.encode: a history given as a string", "either",
       "'i1' read as one behaviour, or a one-line error", r"hist|list|string|str",
       needs_run=True)
def _history_as_str(ctx: Ctx) -> Observed:
  ctx.copy("export")
  records = scorer_records(ctx.base.rows, ctx.base.loader_indices[:2])
  items = [ctx.base.rows[i][3] for i in ctx.base.loader_indices[:2]]
  as_str = dict(records, **{"hist.item_id": items, "hist.category": ["c1", "c2"]})
  as_list = dict(records, **{"hist.item_id": [[v] for v in items],
                             "hist.category": [["c1"], ["c2"]]})
  proc = ctx.script(ENCODE_SCRIPT, "export", json.dumps(as_str), json.dumps(as_list))
  if proc.returncode != 0:
    return Observed(proc)
  got, want = json.loads(proc.stdout.strip().splitlines()[-1])
  bad = [k for k in ("hist.item_id", "hist_len") if k in want and got.get(k) != want[k]]
  return Observed(proc, f"{items[0]!r} encoded as {got['hist.item_id'][0]}, as a list "
                  f"{want['hist.item_id'][0]}" if bad else None)


def _predict_stats(ctx: Ctx, output: str) -> dict:
  with open(ctx.path(output + ".stats.json")) as f:
    return json.load(f)


@probe("input", "predict: Parquet hour column of floats (9.0)", "warn",
       "integral floats accepted, or a loud warning", r"float", needs_run=True, cost=12)
def _parquet_floats(ctx: Ctx) -> Observed:
  import pandas as pd  # noqa: PLC0415
  ctx.copy("run")
  frame = pd.DataFrame(ctx.base.rows, columns=HEADER)
  frame = frame.astype({"hour": float, "price": float, "ts": "int64", "clicked": "int64"})
  frame.to_parquet(ctx.path("new.parquet"))
  proc = ctx.module("mian_jax.predict", "--workdir=run", "--input=new.parquet",
                    "--output=scores.csv")
  if proc.returncode != 0:
    return Observed(proc)
  unseen = _predict_stats(ctx, "scores.csv")["unseen"].get("context.hour", 0)
  return Observed(proc, f"{unseen} of {NUM_ROWS} hours out of vocabulary" if unseen else None)


@probe("input", "predict: input without the label column", "warn",
       "a warning that histories are empty", r"(no|without|missing|absent)\b.{0,60}label|"
       r"label.{0,60}(missing|absent|not (present|found))", needs_run=True, cost=12)
def _predict_no_labels(ctx: Ctx) -> Observed:
  ctx.copy("run")
  k = HEADER.index("clicked")
  write_csv(ctx.path("new.csv"), [r[:k] + r[k + 1:] for r in ctx.base.rows],
            HEADER[:k] + HEADER[k + 1:])
  proc = ctx.module("mian_jax.predict", "--workdir=run", "--input=new.csv", "--output=scores.csv")
  if proc.returncode != 0:
    return Observed(proc)
  moved = _scores_differ(ctx, "scores.csv")
  return Observed(proc, f"{moved}, no warning" if moved else None)


DUPLICATE = r"duplicat|'price'.{0,20}(2|two) times|twice|more than once"


def _write_duplicated_price(path: str, rows) -> None:
  """The log with a second 'price' column (the same values)."""
  k = HEADER.index("price")
  write_csv(path, [[*row, row[k]] for row in rows], [*HEADER, "price"])


@probe("input", "prepare: CSV with a duplicated header column", "fail",
       "one line naming the column", DUPLICATE)
def _dup_header_prepare(ctx: Ctx) -> Observed:
  _write_duplicated_price(ctx.path("log.csv"), ctx.base.rows)
  return Observed(_prepare(ctx))


@probe("input", "predict: CSV with a duplicated header column", "fail",
       "one line naming the column", DUPLICATE, needs_run=True)
def _dup_header_predict(ctx: Ctx) -> Observed:
  ctx.copy("run")
  _write_duplicated_price(ctx.path("new.csv"), ctx.base.rows)
  return Observed(ctx.module("mian_jax.predict", "--workdir=run", "--input=new.csv",
                             "--output=scores.csv"))


@probe("input", "prepare: ';'-separated CSV", "fail", "one line hinting at csv_sep",
       r"csv_sep|separat|delimit")
def _semicolon_csv(ctx: Ctx) -> Observed:
  write_csv(ctx.path("log.csv"), ctx.base.rows, sep=";")
  return Observed(_prepare(ctx))


@probe("input", "prepare: 5% malformed rows (too many fields)", "fail",
       "one line: how many rows are malformed", r"malformed")
def _malformed_prepare(ctx: Ctx) -> Observed:
  rows = [row + ["extra"] if i % 20 == 0 else row for i, row in enumerate(ctx.base.rows)]
  write_csv(ctx.path("log.csv"), [",".join(r).split(",") for r in rows])
  return Observed(_prepare(ctx))


@probe("input", "predict: one malformed row", "fail", "one line naming the line",
       r"line \d+", needs_run=True)
def _malformed_predict(ctx: Ctx) -> Observed:
  ctx.copy("run")
  rows = [list(r) for r in ctx.base.rows]
  rows[10].append("extra")
  write_csv(ctx.path("new.csv"), rows)
  return Observed(ctx.module("mian_jax.predict", "--workdir=run", "--input=new.csv",
                             "--output=scores.csv"))


@probe("input", "predict --skip_bad_rows: one malformed row", "succeed",
       "299 rows scored, 1 skipped", needs_run=True)
def _skip_bad_rows(ctx: Ctx) -> Observed:
  ctx.copy("run")
  rows = [list(r) for r in ctx.base.rows]
  rows[10].append("extra")
  write_csv(ctx.path("new.csv"), rows)
  proc = ctx.module("mian_jax.predict", "--workdir=run", "--input=new.csv",
                    "--output=scores.csv", "--skip_bad_rows")
  if proc.returncode != 0:
    return Observed(proc)
  stats = _predict_stats(ctx, "scores.csv")
  got = (stats["rows_scored"], stats["rows_skipped"])
  return Observed(proc, None if got == (NUM_ROWS - 1, 1) else f"(scored, skipped) = {got}")


@probe("input", "prepare: NaN in the numeric column (3 rows)", "either",
       "finite prepared values, or one line", r"nan|finite|malformed|numeric|price")
def _nan_prepare(ctx: Ctx) -> Observed:
  rows = _rows_with(ctx.base.rows, "price", lambda i, v: "nan" if i % 100 == 7 else v)
  write_csv(ctx.path("log.csv"), rows)
  proc = _prepare(ctx)
  match = re.search(r"prepared directory: (\S+)", proc.stdout + proc.stderr)
  if proc.returncode != 0 or not match:
    return Observed(proc, None if proc.returncode else "no prepared directory printed")
  bad = [p for p in glob.glob(os.path.join(match.group(1), "*", "item.price.npy"))
         if not np.all(np.isfinite(np.load(p)))]
  return Observed(proc, f"non-finite values in {bad[0]}" if bad else None)


@probe("input", "predict: NaN price in the input", "either",
       "finite scores, or one line", r"nan|finite|malformed|numeric|price", needs_run=True)
def _nan_predict(ctx: Ctx) -> Observed:
  ctx.copy("run")
  rows = _rows_with(ctx.base.rows, "price", lambda i, v: "nan" if i % 100 == 7 else v)
  write_csv(ctx.path("new.csv"), rows)
  proc = ctx.module("mian_jax.predict", "--workdir=run", "--input=new.csv", "--output=scores.csv")
  if proc.returncode != 0:
    return Observed(proc)
  import pandas as pd  # noqa: PLC0415
  scores = pd.read_csv(ctx.path("scores.csv"))["score"].to_numpy()
  bad = int(np.sum(~np.isfinite(scores)))
  return Observed(proc, f"{bad} non-finite scores" if bad else None)


@probe("input", "prepare: an empty (0-byte) CSV", "fail", "one line: the file is empty",
       r"empty|no (rows|header|columns)")
def _empty_csv(ctx: Ctx) -> Observed:
  open(ctx.path("log.csv"), "w").close()
  return Observed(_prepare(ctx))


@probe("input", "prepare: a CSV with only its header", "fail", "one line: no rows",
       r"empty|no rows")
def _header_only_csv(ctx: Ctx) -> Observed:
  write_csv(ctx.path("log.csv"), [])
  return Observed(_prepare(ctx))


@probe("input", "predict: an empty (0-byte) input", "fail", "one line: the file is empty",
       r"empty|no (rows|header|columns)", needs_run=True)
def _empty_predict(ctx: Ctx) -> Observed:
  ctx.copy("run")
  open(ctx.path("new.csv"), "w").close()
  return Observed(ctx.module("mian_jax.predict", "--workdir=run", "--input=new.csv",
                             "--output=scores.csv"))


@probe("input", "prepare: labels that are not 0/1", "fail", "one line about the label",
       r"label|clicked|malformed")
def _bad_labels(ctx: Ctx) -> Observed:
  write_csv(ctx.path("log.csv"), _rows_with(ctx.base.rows, "clicked",
                                            lambda i, v: "yes" if v == "1" else "maybe"))
  return Observed(_prepare(ctx))


@probe("input", "prepare: timestamps that are not times", "fail",
       "one line about the timestamp", r"timestamp|ts\b|malformed")
def _bad_timestamps(ctx: Ctx) -> Observed:
  write_csv(ctx.path("log.csv"), _rows_with(ctx.base.rows, "ts", lambda i, v: f"t{v}"))
  return Observed(_prepare(ctx))


command_probe("input", "main: unknown config key", "fail", "one line with a suggestion",
              r"unknown config key.*batch_size",
              ["mian_jax.main", *tabular_flags("--config.train.batchsize=8"), "--workdir=run2"],
              cost=5)


command_probe("input", "main: a value of the wrong type (batch_size=abc)", "fail",
              "one line naming the key", r"batch_size",
              ["mian_jax.main", *tabular_flags("--config.train.batch_size=abc"), "--workdir=run2"],
              cost=5)


command_probe("input", "main: an out-of-range value (batch_size=-4)", "fail",
              "one line naming the key", r"batch_size",
              ["mian_jax.main", *tabular_flags("--config.train.batch_size=-4"), "--workdir=run2"],
              cost=8)


@probe("input", "main: unknown config argument (tabular.py:foo=1)", "fail",
       "one line naming the argument", r"foo", cost=5)
def _unknown_arg(ctx: Ctx) -> Observed:
  flags = tabular_flags(*BASE_STEPS)
  flags[0] += ":foo=1"
  return Observed(ctx.module("mian_jax.main", *flags, "--workdir=run2"))


@probe("input", "prepare: the CSV file is missing", "fail", "one line naming the file",
       r"nope\.csv")
def _missing_csv(ctx: Ctx) -> Observed:
  return Observed(_prepare(ctx, "--config.data.tabular.path=nope.csv"))


command_probe("input", "main: the config file is missing", "fail", "one line naming the file",
              r"nope\.py|config", ["mian_jax.main", "--config=nope.py", "--workdir=run2"], cost=5)


command_probe("input", "predict: the input file is missing", "fail", "one line naming the file",
              r"nope\.csv",
              ["mian_jax.predict", "--workdir=run", "--input=nope.csv", "--output=scores.csv"],
              needs_run=True)


@probe("input", "Scorer.encode: a field missing", "fail", "one line naming the field",
       r"item\.price", needs_run=True)
def _encode_missing_field(ctx: Ctx) -> Observed:
  ctx.copy("export")
  records = scorer_records(ctx.base.rows, ctx.base.loader_indices[:2])
  del records["item.price"]
  return Observed(ctx.script(ENCODE_SCRIPT, "export", json.dumps(records)))


@probe("input", "Scorer.encode: columns of different lengths", "fail",
       "one line naming the lengths", r"length|rows|size|same", needs_run=True)
def _encode_ragged(ctx: Ctx) -> Observed:
  ctx.copy("export")
  records = scorer_records(ctx.base.rows, ctx.base.loader_indices[:3])
  records["item.item_id"] = records["item.item_id"][:2]
  return Observed(ctx.script(ENCODE_SCRIPT, "export", json.dumps(records)))


# --- raw tracebacks


def _read_only_run(ctx: Ctx) -> str | None:
  """Copies the run and mounts it read-only on itself; None, or why it could not."""
  ctx.copy("run")
  return ctx.mount(ctx.path("run"), "--bind", "-o", "ro", ctx.path("run"))


@probe("tracebacks", "train on a read-only workdir", "fail", "one line: cannot write",
       r"read-only|writ|permission", needs_run=True, cost=15)
def _ro_train(ctx: Ctx) -> Observed:
  why = _read_only_run(ctx)
  if why:
    return Observed(Proc(0), skipped=why)
  return Observed(ctx.module("mian_jax.main", "--workdir=run",
                             "--config.train.num_train_steps=18", timeout=180))


@probe("tracebacks", "evaluate on a read-only workdir", "either",
       "metrics printed, or one line: cannot write", r"read-only|writ|permission",
       needs_run=True, cost=12)
def _ro_evaluate(ctx: Ctx) -> Observed:
  why = _read_only_run(ctx)
  if why:
    return Observed(Proc(0), skipped=why)
  return Observed(ctx.module("mian_jax.evaluate", "--workdir=run"))


command_probe("tracebacks", "predict --batch_size=-5", "fail", "one line naming --batch_size",
              r"batch_size",
              ["mian_jax.predict", "--workdir=run", "--input=log.csv", "--output=scores.csv",
               "--batch_size=-5"], needs_run=True)


@probe("tracebacks", "config file with a syntax error", "fail",
       "one line naming the file and line", r"broken\.py.*line \d+|line \d+.*broken\.py", cost=5)
def _config_syntax(ctx: Ctx) -> Observed:
  with open(ctx.path("broken.py"), "w") as f:
    f.write("from configs import tabular\n\n\ndef get_config(arg=None:\n  return None\n")
  return Observed(ctx.module("mian_jax.main", "--config=broken.py", "--workdir=run2"))


command_probe("tracebacks", "evaluate on a missing workdir", "fail", "one line: no run there",
              r"^(?!.*Flag --config).*(no run|not found|does not exist|no such|missing)",
              ["mian_jax.evaluate", "--workdir=nope"], cost=5)


@probe("tracebacks", "evaluate on an empty workdir", "fail", "one line: no run there",
       r"^(?!.*Flag --config).*(no run|not found|does not exist|no such|missing|empty)", cost=5)
def _evaluate_empty(ctx: Ctx) -> Observed:
  os.makedirs(ctx.path("empty"))
  return Observed(ctx.module("mian_jax.evaluate", "--workdir=empty"))


@probe("tracebacks", "predict after the prepared vocab/ was deleted", "either",
       "prepares again (same scores), or one line: vocab/ missing or changed",
       r"^(?!.*before vocabularies).*(vocab|changed after it was prepared)", needs_run=True)
def _vocab_deleted(ctx: Ctx) -> Observed:
  ctx.copy("run")
  for directory in glob.glob(ctx.path("cache", "prepared", "*", "vocab")):
    shutil.rmtree(directory)
  proc = ctx.module("mian_jax.predict", "--workdir=run", "--input=log.csv",
                    "--output=scores.csv")
  if proc.returncode != 0:
    return Observed(proc)
  return Observed(proc, _scores_differ(ctx, "scores.csv"))


def _scores_differ(ctx: Ctx, output: str) -> str | None:
  """None if predict's `output` holds the base run's scores, else how many differ."""
  import pandas as pd  # noqa: PLC0415
  scores = pd.read_csv(ctx.path(output))["score"].to_numpy()
  moved = int(np.sum(np.abs(scores - np.array(ctx.base.scores)) > 1e-6))
  return f"{moved} of {len(scores)} scores differ from the base run's" if moved else None


command_probe("tracebacks", "evaluate --step=999 (no such checkpoint)", "fail",
              "one line naming the steps there", r"999",
              ["mian_jax.evaluate", "--workdir=run", "--step=999"], needs_run=True)


@probe("tracebacks", "predict into a directory that does not exist", "either",
       "scores written, or one line naming the directory", r"nodir", needs_run=True)
def _predict_missing_dir(ctx: Ctx) -> Observed:
  ctx.copy("run")
  proc = ctx.module("mian_jax.predict", "--workdir=run", "--input=log.csv",
                    "--output=nodir/scores.csv")
  ok = proc.returncode != 0 or os.path.isfile(ctx.path("nodir", "scores.csv"))
  return Observed(proc, None if ok else "exit 0 but no scores file")


command_probe("tracebacks", "export --platforms=nope", "fail", "one line naming the platform",
              r"nope|platform",
              ["mian_jax.export", "--workdir=run", "--out=out", "--platforms=nope"], needs_run=True)


command_probe("tracebacks", "export from a missing workdir", "fail", "one line: no run there",
              r"nope|no run|not found|does not exist|no such|missing",
              ["mian_jax.export", "--workdir=nope", "--out=out"], cost=6)


# --- disk full


def _full_disk(ctx: Ctx, leave_bytes: int) -> str | None:
  """A 3 MiB tmpfs at disk/, filled up to about `leave_bytes` free; None, or why not."""
  why = ctx.mount(ctx.path("disk"), "-t", "tmpfs", "-o", "size=3m", "tmpfs")
  if why is None:
    fill_disk(ctx.path("disk"), leave_bytes)
  return why


@probe("disk full", "train with the disk filling up at a checkpoint save", "fail",
       "one line: no space left; nothing half-written", r"space|disk|full", cost=35)
def _disk_full_train(ctx: Ctx) -> Observed:
  why = _full_disk(ctx, 450_000)  # room for config.json, metrics and one checkpoint
  if why:
    return Observed(Proc(0), skipped=why)
  return Observed(ctx.module("mian_jax.main", *tabular_flags(*BASE_STEPS),
                             "--workdir=disk/run", timeout=240))


def _write_to_full_disk(ctx: Ctx, leave_bytes: int, output: str, *command: str) -> Observed:
  """`python -m <command>` on a copy of the base run, writing `output` onto a full disk/ (about
  `leave_bytes` free); a problem if it left some of `output` there."""
  ctx.copy("run")
  why = _full_disk(ctx, leave_bytes)
  if why:
    return Observed(Proc(0), skipped=why)
  proc = ctx.module(*command)
  path = ctx.path("disk", output)
  left = os.path.exists(path) and (not os.path.isdir(path) or bool(os.listdir(path)))
  return Observed(proc, f"left a partial disk/{output}" if left else None)


@probe("disk full", "export onto a full disk", "fail",
       "one line: no space left; no partial export", r"space|disk|full", needs_run=True)
def _disk_full_export(ctx: Ctx) -> Observed:
  return _write_to_full_disk(ctx, 40_000, "export", "mian_jax.export", "--workdir=run",
                             "--out=disk/export", "--platforms=cpu")


@probe("disk full", "predict onto a full disk", "fail",
       "one line: no space left; no partial output", r"space|disk|full", needs_run=True)
def _disk_full_predict(ctx: Ctx) -> Observed:
  return _write_to_full_disk(ctx, 0, "scores.csv", "mian_jax.predict", "--workdir=run",
                             "--input=log.csv", "--output=disk/scores.csv")


# --- permissions (the harness runs with umask 022)


def _unreadable(paths: Sequence[str]) -> list[str]:
  """Those of `paths` that other users cannot read (or, for a directory, enter)."""
  bad = []
  for path in paths:
    mode = os.stat(path).st_mode & 0o777
    need = 0o055 if os.path.isdir(path) else 0o044
    if mode & need != need:
      bad.append(f"{os.path.basename(path)} {oct(mode)}")
  return bad


@probe("permissions", "export directory readable by a serving account", "succeed",
       "directories 0755, files 0644 (umask 022)", needs_run=True, cost=10)
def _export_mode(ctx: Ctx) -> Observed:
  ctx.copy("run")
  proc = ctx.module("mian_jax.export", "--workdir=run", "--out=out", "--platforms=cpu")
  if proc.returncode != 0:
    return Observed(proc)
  bad = _unreadable([ctx.path("out"), *glob.glob(ctx.path("out", "**"), recursive=True)])
  return Observed(proc, f"not readable by others: {', '.join(bad[:3])}" if bad else None)


@probe("permissions", "predict output readable by others", "succeed",
       "scores file 0644 (umask 022)", needs_run=True)
def _predict_mode(ctx: Ctx) -> Observed:
  ctx.copy("run")
  proc = ctx.module("mian_jax.predict", "--workdir=run", "--input=log.csv",
                    "--output=scores.csv")
  if proc.returncode != 0:
    return Observed(proc)
  bad = _unreadable([ctx.path("scores.csv"), ctx.path("scores.csv.stats.json")])
  return Observed(proc, f"not readable by others: {', '.join(bad)}" if bad else None)


@probe("permissions", "evaluate's metrics files readable by others", "succeed",
       "eval/*.json 0644 (umask 022)", needs_run=True)
def _eval_mode(ctx: Ctx) -> Observed:
  ctx.copy("run")
  proc = ctx.module("mian_jax.evaluate", "--workdir=run", "--step=6")
  if proc.returncode != 0:
    return Observed(proc)
  bad = _unreadable(glob.glob(ctx.path("run", "eval", "*")))
  return Observed(proc, f"not readable by others: {', '.join(bad[:3])}" if bad else None)


# --- outputs


@probe("outputs", "evaluate --predictions has row keys", "succeed",
       "user, item, timestamp or row number columns", needs_run=True, cost=10)
def _prediction_keys(ctx: Ctx) -> Observed:
  import pyarrow.parquet as pq  # noqa: PLC0415
  ctx.copy("run")
  proc = ctx.module("mian_jax.evaluate", "--workdir=run", "--predictions")
  files = glob.glob(ctx.path("run", "eval", "*predictions*.parquet"))
  if proc.returncode != 0:
    return Observed(proc)
  if not files:
    return Observed(proc, "no predictions file")
  columns = pq.read_schema(files[0]).names
  keyed = any(re.search(r"user|item_id|input_row|^row|^ts$|timestamp", c) for c in columns)
  return Observed(proc, None if keyed else f"columns {columns}: no key to join on")


# ------------------------------------------------------------------------------------ runner


@dataclasses.dataclass
class Row:
  cls: str
  probe: str
  expected: str
  outcome: str
  as_expected: bool
  message: str
  seconds: float


def run_probe(p: Probe, base: Base, log_dir: str) -> Row:
  """Runs one probe in its own directory and classifies what it saw."""
  slug = re.sub(r"[^A-Za-z0-9]+", "_", p.name).strip("_")[:60]
  start = time.monotonic()
  ctx = Ctx(base, slug, log_dir)
  try:
    seen = p.fn(ctx)
  except Exception as e:  # noqa: BLE001 - a broken probe is reported, not fatal to the suite
    seen = Observed(Proc(0), skipped=f"probe failed to run: {type(e).__name__}: {e}")
  finally:
    ctx.close()
  outcome, message = classify(p.expect, seen)
  # Paths relative to the probe's directory (its cwd), the scratch root as $ROOT.
  message = message.replace(ctx.dir + os.sep, "").replace(ctx.dir, ".")
  message = message.replace(base.root, "$ROOT").replace(ROOT + os.sep, "")  # repo-relative
  return Row(p.cls, p.name, p.expect.text, outcome, as_expected(p.expect, outcome),
             " ".join(message.split()), time.monotonic() - start)


def run_all(probes: Sequence[Probe], base: Base, log_dir: str, jobs: int,
            progress=sys.stderr) -> list[Row]:
  """Runs `probes`, longest first, `jobs` at a time; rows in the order of `probes`."""
  order = sorted(range(len(probes)), key=lambda i: -probes[i].cost)
  rows: list[Row | None] = [None] * len(probes)
  done = [0]
  lock = threading.Lock()

  def one(i: int) -> None:
    rows[i] = run_probe(probes[i], base, log_dir)
    with lock:
      done[0] += 1
      r = rows[i]
      print(f"[{done[0]}/{len(probes)}] {r.outcome:<19} {r.seconds:5.1f}s  {r.cls}: {r.probe}",
            file=progress, flush=True)

  pool = ThreadPoolExecutor(max_workers=max(jobs, 1))
  try:
    list(pool.map(one, order))
  except BaseException:
    kill_live_groups()  # so that the running probes return at once
    raise
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
  return [r for r in rows if r is not None]


def counts(rows: Sequence[Row]) -> dict[str, int]:
  return {o: sum(r.outcome == o for r in rows) for o in OUTCOMES if any(r.outcome == o
                                                                           for r in rows)}


def _cell(text: str, limit: int = 180) -> str:
  text = text if len(text) <= limit else text[:limit - 1] + "…"
  return text.replace("|", "\\|")


def markdown(rows: Sequence[Row], meta: dict) -> str:
  """The report: a header line, counts per outcome, one table row per probe."""
  total = ", ".join(f"{n} {o}" for o, n in counts(rows).items())
  lines = [f"# Fault suite: {len(rows)} probes", "",
           f"{meta['date']}, commit {meta['commit']}, {meta['seconds']:.0f} s with "
           f"--jobs={meta['jobs']} on {meta['cpus']} CPUs.", "",
           f"**{total}**; {sum(not r.as_expected for r in rows)} not as expected.", "",
           "| class | probe | expected | outcome | message seen |", "|---|---|---|---|---|"]
  for r in rows:
    outcome = r.outcome if r.as_expected else f"**{r.outcome}**"
    lines.append(f"| {r.cls} | {_cell(r.probe)} | {_cell(r.expected)} | {outcome} | "
                 f"{_cell(r.message)} |")
  return "\n".join(lines) + "\n"


def commit_label() -> str:
  def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
  head = git("rev-parse", "--short", "HEAD") or "unknown"
  return head + (" with uncommitted changes" if git("status", "--porcelain") else "")


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("out", "runs/faults", "where faults.md, faults.json and logs/ go",
                      flag_values=fv)
  flags.DEFINE_string("only", "", "regex: run the probes whose class or name matches",
                      flag_values=fv)
  flags.DEFINE_integer("jobs", 2, "probes run at a time", flag_values=fv)
  flags.DEFINE_bool("keep", False, "keep the scratch directory", flag_values=fv)
  flags.DEFINE_bool("list", False, "list the probes and exit", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> list[Row]:
  args = common.parse_flags(argv, __doc__, define_flags)
  probes = [p for p in PROBES if re.search(args.only, f"{p.cls}: {p.name}", re.I)]
  if args.list or not probes:
    for p in probes:
      print(f"{p.cls}: {p.name} -> {p.expect.text}")
    sys.exit(0 if probes else f"error: no probe matches --only={args.only!r}")
  os.umask(0o022)
  signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the probes, then exit
  out = os.path.abspath(args.out)
  log_dir = os.path.join(out, "logs")
  shutil.rmtree(log_dir, ignore_errors=True)
  os.makedirs(log_dir)
  root = tempfile.mkdtemp(prefix="mian_faults_")
  start = time.monotonic()
  try:
    base = make_base(root)
    if any(p.needs_run for p in probes):
      print("training, exporting and scoring the base run ...", file=sys.stderr, flush=True)
      run_base(base, log_dir)
    rows = run_all(probes, base, log_dir, args.jobs)
  finally:
    kill_live_groups()
    if args.keep:
      print(f"scratch directory kept: {root}", file=sys.stderr)
    else:
      shutil.rmtree(root, ignore_errors=True)
  meta = {"date": datetime.date.today().isoformat(), "commit": commit_label(),
          "seconds": time.monotonic() - start, "jobs": args.jobs, "cpus": os.cpu_count()}
  with open(os.path.join(out, "faults.md"), "w") as f:
    f.write(markdown(rows, meta))
  with open(os.path.join(out, "faults.json"), "w") as f:
    json.dump({**meta, "counts": counts(rows), "probes": [dataclasses.asdict(r) for r in rows]},
              f, indent=1)
  print(markdown(rows, meta))
  return rows


if __name__ == "__main__":
  try:
    main()
  except KeyboardInterrupt:
    print("interrupted: every probe was stopped; no report written", file=sys.stderr)
    sys.exit(130)
