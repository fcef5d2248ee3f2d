"""Starts N processes of one multi-process run on this machine (JAX's distributed runtime).

  python -m launch.local --num_processes=2 [--cpu_devices_per_process=1] [--timeout=0] \
      [--module=mian_jax.main] -- --config=configs/synthetic.py --workdir=runs/two

Every process runs `python -m <module> <arguments after -->` with MIAN_JAX_DISTRIBUTED=1 and
the coordinator 127.0.0.1:<a free port>, the process count and its id in the environment
(`cli.init_distributed`), exactly as launch/multihost.sh gives them on several hosts. Each
process reads only its own rows of every batch (`pipeline.local_slice`); process 0 alone writes
metrics, evaluation files and checkpoint metadata. With --cpu_devices_per_process=K each process
sees K CPU devices (JAX_NUM_CPU_DEVICES; a --xla_force_host_platform_device_count in XLA_FLAGS is
dropped), so a run of N processes has N * K devices, as one process with N * K devices has.

Each line a process prints is shown prefixed with "[p<id>] ". When a process fails, the others
are stopped (SIGTERM, then SIGKILL after --grace seconds) instead of waiting forever in a
collective for a peer that is gone; likewise all of them when --timeout passes. The exit status
is 0 when every process exited 0, else the first failure's status (124 for the timeout).

On a cluster, use launch/multihost.sh on each host (or launch/slurm.sbatch under SLURM).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

TIMEOUT_STATUS = 124  # as timeout(1)
_DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")


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


def _pump(stream, prefix: str, out) -> None:
  for line in iter(stream.readline, ""):
    out.write(prefix + line)
    out.flush()
  stream.close()


def _stop(procs: Sequence[subprocess.Popen], grace: float) -> None:
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


def launch(args: Sequence[str], num_processes: int, cpu_devices_per_process: int = 0,
           module: str = "mian_jax.main", timeout: float = 0, grace: float = 10.0,
           out=None) -> int:
  """Runs the processes (module docstring); returns the exit status."""
  out = out or sys.stdout
  port = free_port()
  procs, pumps = [], []
  for i in range(num_processes):
    env = process_env(dict(os.environ), i, num_processes, port, cpu_devices_per_process)
    p = subprocess.Popen([sys.executable, "-m", module, *args], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
    procs.append(p)
    pumps.append(threading.Thread(target=_pump, args=(p.stdout, f"[p{i}] ", out), daemon=True))
    pumps[-1].start()
  deadline = time.monotonic() + timeout if timeout else None
  status = 0
  try:
    while any(p.poll() is None for p in procs):
      failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
      if failed:
        status = failed[0]
        out.write(f"[launch] a process exited with status {status}; stopping the others\n")
        _stop(procs, grace)
        break
      if deadline is not None and time.monotonic() > deadline:
        status = TIMEOUT_STATUS
        out.write(f"[launch] --timeout={timeout:g} s passed; stopping every process\n")
        _stop(procs, grace)
        break
      time.sleep(0.1)
  except KeyboardInterrupt:
    _stop(procs, grace)
    raise
  for t in pumps:
    t.join()
  if status == 0:
    status = next((p.returncode for p in procs if p.returncode), 0)
  return status


def main(argv: Sequence[str] | None = None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  passed = argv[argv.index("--") + 1:] if "--" in argv else []
  own = argv[:argv.index("--")] if "--" in argv else argv
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--num_processes", type=int, required=True)
  p.add_argument("--cpu_devices_per_process", type=int, default=0,
                 help="CPU devices each process sees (0: as the environment says)")
  p.add_argument("--module", default="mian_jax.main", help="the entry point every process runs")
  p.add_argument("--timeout", type=float, default=0, help="seconds; 0 = none")
  p.add_argument("--grace", type=float, default=10.0,
                 help="seconds between SIGTERM and SIGKILL when stopping processes")
  a = p.parse_args(own)
  if a.num_processes < 1 or a.cpu_devices_per_process < 0:
    p.error("--num_processes must be at least 1 and --cpu_devices_per_process at least 0")
  if not passed:
    p.error("give the entry point's arguments after --, e.g. -- --config=configs/synthetic.py")
  sys.exit(launch(passed, a.num_processes, a.cpu_devices_per_process, a.module, a.timeout,
                  a.grace))


if __name__ == "__main__":
  main()
