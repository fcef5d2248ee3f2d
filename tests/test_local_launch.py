"""launch/local.py and launch/multihost.sh as a user runs them, with stand-in entry points
(--module) that fail on purpose: a dead process is noticed at once whichever it is, named with
its status, and the others are stopped; a coordinator port already in use is a one-line error
before anything starts."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO

# A stand-in entry point: process 1 ends as the test says (an exit status or a signal), process 0
# waits, as a rank blocked in a collective would, and leaves a file saying it started.
_RANK = """
import os, signal, sys, time
open(os.path.join(os.environ["OUT"], "started" + os.environ["MIAN_JAX_PROCESS_ID"]), "w").close()
if os.environ["MIAN_JAX_PROCESS_ID"] == "1":
  how = os.environ["HOW"]
  if how.startswith("SIG"):
    os.kill(os.getpid(), getattr(signal, how))
  sys.exit(int(how))
time.sleep(120)
"""


def _launch(tmp_path, how, *flags, timeout=60):
  (tmp_path / "stand_in_rank.py").write_text(_RANK)
  env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}", OUT=str(tmp_path), HOW=how)
  started = time.monotonic()
  done = subprocess.run([sys.executable, "-m", "launch.local", "--num_processes=2",
                         "--module=stand_in_rank", "--grace=5", *flags, "--", "--x"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
  return done, time.monotonic() - started


@pytest.mark.parametrize("how, status, said", [
    ("3", 3, "[launch] process 1 exited with status 3; stopped the others"),
    ("SIGKILL", 128 + signal.SIGKILL,
     "[launch] process 1 was killed by SIGKILL (status 137); stopped the others")])
def test_a_dead_process_1_stops_process_0_at_once_and_gives_its_status(tmp_path, how, status,
                                                                      said):
  done, seconds = _launch(tmp_path, how)
  assert done.returncode == status, done.stdout[-2000:]
  last = done.stdout.splitlines()[-1]
  assert last.startswith(said), done.stdout[-2000:]
  if "their output after that: " in last:  # process 0 was still alive when process 1 died
    assert os.path.isfile(last.rsplit("their output after that: ", 1)[1].rstrip(")"))
  assert seconds < 30  # process 0 sleeps 120 s: it was stopped, not waited for


def _busy_port():
  s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  s.bind(("127.0.0.1", 0))
  s.listen()
  return s, s.getsockname()[1]


def test_a_busy_port_is_a_one_line_error_before_any_process_starts(tmp_path):
  holder, port = _busy_port()
  with holder:
    done, _ = _launch(tmp_path, "0", f"--port={port}")
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == [
      f"error: the coordinator port {port} is already in use on 127.0.0.1; pass another "
      "--port, or --port=0 for a free one"]
  assert not list(tmp_path.glob("started*"))


def test_multihost_process_0_on_a_busy_port_is_a_one_line_error(tmp_path):
  holder, port = _busy_port()
  env = dict(os.environ, COORDINATOR=f"127.0.0.1:{port}", NUM_PROCESSES="2", PROCESS_ID="0",
             PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
             MIAN_JAX_CACHE=str(tmp_path / "cache"))
  with holder:
    done = subprocess.run(["bash", "launch/multihost.sh", "--config=configs/synthetic.py",
                           f"--workdir={tmp_path}/run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines() == [
      f"error: the coordinator port {port} (COORDINATOR=127.0.0.1:{port}) is already in use on "
      "this host; choose another port"]
  assert not os.path.exists(tmp_path / "run")


# Both stand-in ranks wait until a SIGTERM, then "save" (a file, after a pause) and exit 143.
_SAVING_RANK = """
import os, signal, sys, time
out, rank = os.environ["OUT"], os.environ["MIAN_JAX_PROCESS_ID"]
def save(signum, frame):
  time.sleep(1.0)
  open(os.path.join(out, "saved" + rank), "w").close()
  sys.exit(128 + signum)
signal.signal(signal.SIGTERM, save)
signal.signal(signal.SIGINT, save)
open(os.path.join(out, "started" + rank), "w").close()
time.sleep(120)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_launcher_lets_every_process_save_then_says_one_line(tmp_path, signum):
  (tmp_path / "saving_rank.py").write_text(_SAVING_RANK)
  env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}", OUT=str(tmp_path))
  launcher = subprocess.Popen([sys.executable, "-m", "launch.local", "--num_processes=2",
                               "--module=saving_rank", "--grace=0.5", "--", "--x"], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 60
  while len(list(tmp_path.glob("started*"))) < 2 and time.monotonic() < deadline:
    time.sleep(0.1)
  launcher.send_signal(signum)  # to the launcher alone, as `kill` or a scheduler sends it
  stdout, stderr = launcher.communicate(timeout=60)
  assert launcher.returncode == 128 + signum, stdout + stderr
  assert "Traceback" not in stdout + stderr
  assert stdout.splitlines()[-1].startswith(
      f"[launch] interrupted ({signal.Signals(signum).name}): every process stopped after "
      "saving")
  # Each rank saved although its save outlasted --grace: an interrupt waits for the saves.
  assert sorted(p.name for p in tmp_path.glob("saved*")) == ["saved0", "saved1"]
