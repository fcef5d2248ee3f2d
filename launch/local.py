"""Starts N processes of one multi-process run on this machine (JAX's distributed runtime).

  python -m launch.local --num_processes=2 [--cpu_devices_per_process=1] [--timeout=0] \\
      [--port=0] [--module=mian_jax.main] -- --config=configs/synthetic.py --workdir=runs/two

Every process runs `python -m <module> <arguments after -->` with MIAN_JAX_DISTRIBUTED=1 and
the coordinator 127.0.0.1:<a free port>, the process count and its id in the environment
(`cli.init_distributed`), exactly as launch/multihost.sh gives them on several hosts. Each
process reads only its own rows of every batch (`pipeline.local_slice`); process 0 alone writes
metrics, evaluation files and checkpoint metadata. With --cpu_devices_per_process=K each process
sees K CPU devices (JAX_NUM_CPU_DEVICES; a --xla_force_host_platform_device_count in XLA_FLAGS is
dropped), so a run of N processes has N * K devices, as one process with N * K devices has.

Each line a process prints is shown prefixed with "[p<id>] ". When any process fails (every
process is polled, so a dead process 1 is noticed at once, not after JAX's heartbeat timeout),
the launcher says which one and how it ended, and stops the others (SIGTERM, then SIGKILL after
--grace seconds) instead of leaving them waiting in a collective for a peer that is gone;
likewise all of them when --timeout passes. The exit status is 0 when every process exited 0,
else the failed process's status (128 + N for death by signal N; 124 for the timeout). A
--port that is already taken is a one-line error before anything starts.

On a cluster, use launch/multihost.sh on each host (or launch/slurm.sbatch under SLURM).
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

from absl import flags

from benchmarks.common import parse_flags, usage_error  # not launch.runner: it imports jax

TIMEOUT_STATUS = 124  # as timeout(1)
INTERRUPTS = (signal.SIGINT, signal.SIGTERM)
SAVE_GRACE_S = 120.0  # how long an interrupted process may take to save before SIGKILL
_DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")


class PortInUseError(Exception):
  """The coordinator's port is taken: a one-line error before any process starts."""


def free_port() -> int:
  """A TCP port that was free on 127.0.0.1 a moment ago."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: dict[str, str], process_id: int, num_processes: int, port: int,
                cpu_devices: int) -> dict[str, str]:
  """The environment of process `process_id` (module docstring)."""
  env = dict(base, MIAN_JAX_DISTRIBUTED="1", MIAN_JAX_COORDINATOR=f"127.0.0.1:{port}",
             MIAN_JAX_NUM_PROCESSES=str(num_processes), MIAN_JAX_PROCESS_ID=str(process_id))
  if cpu_devices:
    env["JAX_NUM_CPU_DEVICES"] = str(cpu_devices)
    flags = _DEVICE_FLAG.sub("", env.get("XLA_FLAGS", "")).strip()
    if flags:
      env["XLA_FLAGS"] = flags
    else:
      env.pop("XLA_FLAGS", None)
  return env


class _Output:
  """Where the processes' lines go: `out`, until `divert` sends every line after it to a file
  (once a process has failed, the others' dying words, e.g. a collective's traceback about the
  lost peer, are kept there instead of burying the launcher's one line)."""

  def __init__(self, out):
    self.out, self.file, self.path, self.lock = out, None, "", threading.Lock()

  def write(self, text: str) -> None:
    with self.lock:
      target = self.file or self.out
      target.write(text)
      target.flush()

  def divert(self) -> str:
    with self.lock:
      if self.file is None:
        fd, self.path = tempfile.mkstemp(prefix="launch-local-", suffix=".log", text=True)
        self.file = os.fdopen(fd, "w")
      return self.path

  def close(self) -> None:
    if self.file is not None:
      self.file.close()


def _pump(stream, prefix: str, out: _Output) -> None:
  for line in iter(stream.readline, ""):
    out.write(prefix + line)
  stream.close()


class _Interrupted(Exception):
  """SIGINT or SIGTERM reached the launcher; `signum` says which."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum


def _raise_interrupted(signum, frame) -> None:
  del frame
  raise _Interrupted(signum)


def _stop(procs: Sequence[subprocess.Popen], grace: float, out: _Output | None = None) -> None:
  """SIGTERM to every live process, SIGKILL to those still alive `grace` seconds later; their
  output from now on goes to `out`'s file."""
  if out is not None and any(p.poll() is None for p in procs):
    out.divert()
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  deadline = time.monotonic() + grace
  for p in procs:
    try:
      p.wait(max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def exit_status(returncode: int) -> int:
  """A Popen return code as a shell exit status: death by signal N is 128 + N."""
  return 128 - returncode if returncode < 0 else returncode


def describe_exit(returncode: int) -> str:
  """"exited with status 3" | "was killed by SIGKILL (status 137)"."""
  if returncode < 0:
    try:
      name = signal.Signals(-returncode).name
    except ValueError:
      name = f"signal {-returncode}"
    return f"was killed by {name} (status {exit_status(returncode)})"
  return f"exited with status {returncode}"


def first_failure(procs: Sequence[subprocess.Popen]) -> tuple[int, int] | None:
  """(process id, return code) of a process that exited non-zero, polling every process (a
  dead process 1 must not wait for process 0); None while none has."""
  codes = [p.poll() for p in procs]  # a list, not a generator: poll them all
  return next(((i, code) for i, code in enumerate(codes) if code not in (None, 0)), None)


def port_in_use(port: int, host: str = "") -> bool:
  """Whether binding TCP `port` on `host` ("" = every interface) fails because it is taken."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is free
    try:
      s.bind((host, port))
    except OSError as e:
      if e.errno == errno.EADDRINUSE:
        return True
      raise
  return False


def launch(args: Sequence[str], num_processes: int, cpu_devices_per_process: int = 0,
           module: str = "mian_jax.main", timeout: float = 0, grace: float = 10.0,
           out=None, port: int = 0) -> int:
  """Runs the processes (module docstring); returns the exit status.

  Args:
    port: the coordinator's port on 127.0.0.1; 0 = a free one.

  Raises:
    PortInUseError: `port` is taken (nothing was started).
  """
  out = _Output(out or sys.stdout)
  if port and port_in_use(port, "127.0.0.1"):
    raise PortInUseError(f"the coordinator port {port} is already in use on 127.0.0.1; pass "
                         "another --port, or --port=0 for a free one")
  port = port or free_port()
  procs, pumps = [], []
  for i in range(num_processes):
    env = process_env(dict(os.environ), i, num_processes, port, cpu_devices_per_process)
    p = subprocess.Popen([sys.executable, "-m", module, *args], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
    procs.append(p)
    pumps.append(threading.Thread(target=_pump, args=(p.stdout, f"[p{i}] ", out), daemon=True))
    pumps[-1].start()
  deadline = time.monotonic() + timeout if timeout else None
  status, note = 0, ""
  handlers = _install(_raise_interrupted)
  try:
    while any(p.poll() is None for p in procs):
      failed = first_failure(procs)
      if failed:
        index, code = failed
        status = exit_status(code)
        note = f"[launch] process {index} {describe_exit(code)}; stopped the others"
        _stop(procs, grace, out)
        break
      if deadline is not None and time.monotonic() > deadline:
        status = TIMEOUT_STATUS
        note = f"[launch] --timeout={timeout:g} s passed; stopped every process"
        _stop(procs, grace, out)
        break
      time.sleep(0.1)
  except _Interrupted as e:
    _install(signal.SIG_IGN)  # a second Ctrl-C must not cut the processes' saves short
    # Every process saves at the step it reached on SIGTERM (as on SIGINT); wait for the saves.
    _stop(procs, max(grace, SAVE_GRACE_S), out)
    status = 128 + e.signum
    note = (f"[launch] interrupted ({signal.Signals(e.signum).name}): every process stopped "
            "after saving; rerun the same command to resume")
  finally:
    _install(handlers)
  for t in pumps:
    t.join()
  if status == 0 and (failed := first_failure(procs)):
    index, code = failed  # every process ended between two polls
    status = exit_status(code)
    note = f"[launch] process {index} {describe_exit(code)}"
  if out.file is not None:
    note += f" (their output after that: {out.path})"
  out.close()
  if note:
    print(note, file=out.out, flush=True)
  return status


def _install(handler) -> dict:
  """Sets `handler` (or a dict signal -> handler) for SIGINT and SIGTERM; returns the old ones.
  Only the main thread may set handlers: elsewhere (a test's thread) nothing changes."""
  if threading.current_thread() is not threading.main_thread():
    return {}
  wanted = handler if isinstance(handler, dict) else {s: handler for s in INTERRUPTS}
  return {s: signal.signal(s, h) for s, h in wanted.items()}


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_integer("num_processes", None, "processes to start", lower_bound=1,
                       flag_values=fv)
  flags.mark_flag_as_required("num_processes", flag_values=fv)
  flags.DEFINE_integer("cpu_devices_per_process", 0,
                       "CPU devices each process sees (0: as the environment says)",
                       lower_bound=0, flag_values=fv)
  flags.DEFINE_string("module", "mian_jax.main", "the entry point every process runs",
                      flag_values=fv)
  flags.DEFINE_float("timeout", 0.0, "seconds; 0 = none", flag_values=fv)
  flags.DEFINE_float("grace", 10.0, "seconds between SIGTERM and SIGKILL when stopping processes",
                     flag_values=fv)
  flags.DEFINE_integer("port", 0, "the coordinator's port on 127.0.0.1 (0: a free one)",
                       lower_bound=0, upper_bound=65535, flag_values=fv)


def main(argv: Sequence[str] | None = None) -> None:
  a = parse_flags(argv, __doc__, define_flags, rest="passed")
  if not a.passed:
    usage_error("give the entry point's arguments after --, e.g. -- --config=configs/synthetic.py")
  try:
    sys.exit(launch(a.passed, a.num_processes, a.cpu_devices_per_process, a.module, a.timeout,
                    a.grace, port=a.port))
  except PortInUseError as e:
    usage_error(str(e))


if __name__ == "__main__":
  main()
