"""The command lines as a user types them: main, resume, evaluate, and one-line errors."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
from absl import flags
from ml_collections import config_flags

from mian_jax import cli, train
from tests.helpers import REPO, TINY


def run(module, *args, tmp_path, config="configs/synthetic.py"):
  env = dict(os.environ, MIAN_JAX_CACHE=str(tmp_path / "cache"))
  flags = [f"--config={config}"] if config else []
  return subprocess.run([sys.executable, "-m", module, *flags, *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_main_resumes_and_evaluate_restores_its_checkpoint(tmp_path):
  workdir = f"--workdir={tmp_path / 'run'}"
  first = run("mian_jax.main", workdir, *TINY, "--config.train.num_train_steps=8",
              tmp_path=tmp_path)
  assert first.returncode == 0, first.stderr[-2000:]
  assert "(new)" in first.stderr and "samples/s" in first.stderr
  # Resume and evaluate without --config: the workdir's config.json (issue 11, problem 5).
  second = run("mian_jax.main", workdir, "--config.train.num_train_steps=12",
               tmp_path=tmp_path, config=None)
  assert second.returncode == 0, second.stderr[-2000:]
  assert "(resumed)" in second.stderr and "steps 8 -> 12" in second.stderr
  assert "Done: test AUC" in second.stderr.strip().splitlines()[-1]

  reported = (tmp_path / "run" / "eval" / "valid_metrics.json").read_text()
  evaluated = run("mian_jax.evaluate", workdir, "--step=8", "--split=valid", "--predictions",
                  tmp_path=tmp_path, config=None)
  assert evaluated.returncode == 0, evaluated.stderr[-2000:]
  assert (tmp_path / "run" / "eval" / "valid_metrics.json").read_text() == reported
  with open(tmp_path / "run" / "eval" / "valid_metrics_step8.json") as f:
    metrics = json.load(f)
  assert metrics["step"] == 8 and metrics["num_examples"] == 256
  assert {"auc", "logloss", "gauc", "oracle_auc"} <= set(metrics)
  frame = pd.read_parquet(tmp_path / "run" / "eval" / "valid_predictions_step8.parquet")
  assert len(frame) == 256
  assert {"score", "label", "group_id", "attention_ibim", "attention_gim"} <= set(frame)
  assert len(frame["attention_gim"][0]) == 7
  assert frame["score"].between(0, 1).all()
  # A config that shapes another run is refused, naming the key, with or without --config.
  for config in ("configs/synthetic.py", None):
    mismatch = run("mian_jax.evaluate", workdir, *(TINY if config else []),
                   "--config.model.num_heads=4", tmp_path=tmp_path, config=config)
    assert mismatch.returncode == 1 and "Traceback" not in mismatch.stderr
    last = mismatch.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "model.num_heads: 2 -> 4" in last, last


def test_evaluate_without_checkpoints_is_a_clear_error(tmp_path):
  result = run("mian_jax.evaluate", f"--workdir={tmp_path / 'empty'}", *TINY, tmp_path=tmp_path)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1].startswith("error: no checkpoints in")


_MISSPELT = "error: unknown config key {} (did you mean {}?)"


@pytest.mark.parametrize("args,status,message", [
    (["--config.train.batchsize=1"], 2, _MISSPELT.format("train.batchsize", "train.batch_size")),
    (["--config.trian.batch_size=1"], 2, _MISSPELT.format("trian.batch_size", "train.batch_size")),
    (["--config.trian.batchsize=1"], 2, _MISSPELT.format("trian.batchsize", "train.batch_size")),
    (["--noconfig.model.use_gimm"], 2, _MISSPELT.format("model.use_gimm", "model.use_gim")),
    (["--config.model.xyzzy=1"], 2, "error: unknown config key model.xyzzy"),
    (["--config.model.num_heads=abc"], 2,
     "error: flag --config.model.num_heads=abc: invalid literal for int() with base 10: 'abc'"),
    (["--config.model.transformer=postln"], 1,
     "error: config.model.transformer='postln' is not one of ('pre_ln', 'post_ln', 'none')"),
    (["--config.model.num_heads=3"], 1, "error: model.num_heads=3 must divide the behaviour "
     "width 8 (embed_dim x 2 behaviour fields)"),
    (["--config.data.source=prepared", "--config.data.prepared_dir=/nonexistent/dir"], 1,
     "error: no prepared data at /nonexistent/dir (missing schema.json)"),
    (["--config.model.mlp_dims=abc"], 1,
     "error: config.model.mlp_dims must be positive integers, e.g. (32, 8), got ('abc',)"),
    (["--config.train.seed=-1"], 1, "error: config.train.seed must be an integer >= 0, got -1"),
    (["--config.data.synthetic.seed=-2"], 1,
     "error: config.data.synthetic.seed must be an integer >= 0, got -2"),
])
def test_a_bad_flag_or_value_is_one_line_before_any_work(tmp_path, monkeypatch, capsys, args,
                                                         status, message):
  """`python -m mian_jax.main` on TINY (less the keys `args` set) in this process: main's flags
  defined afresh for this argv, parsed by cli.parse_flags, then cli.run_or_exit(train...)."""
  keys = {arg.split("=")[0] for arg in args}
  argv = ["main", f"--config={REPO}/configs/synthetic.py", f"--workdir={tmp_path / 'bad'}",
          *(flag for flag in TINY if flag.split("=")[0] not in keys), *args]
  values = flags.FlagValues()
  monkeypatch.setattr(flags, "FLAGS", values)
  flags.DEFINE_bool("show_config", False, "", flag_values=values)
  flags.DEFINE_string("workdir", None, "", flag_values=values)
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  with pytest.raises(SystemExit) as exit_info:
    cli.parse_flags(argv)
    cli.run_or_exit(train.train_and_evaluate, values.config, values.workdir)
  if status == 2:  # parse_flags: exit status 2, the line on stderr
    assert (exit_info.value.code, capsys.readouterr().err.strip()) == (2, message)
  else:  # run_or_exit: sys.exit(line), which prints it and exits 1
    assert exit_info.value.code == message
  assert not (tmp_path / "bad" / "checkpoints").exists()


@pytest.mark.slow
def test_a_misspelt_key_is_one_line_on_stderr_and_creates_no_workdir(tmp_path):
  result = run("mian_jax.main", f"--workdir={tmp_path / 'bad'}", "--config.train.batchsize=1",
               tmp_path=tmp_path)
  assert (result.returncode, result.stderr.strip()) == (
      2, _MISSPELT.format("train.batchsize", "train.batch_size"))
  assert not (tmp_path / "bad").exists()


def test_help_names_show_config_and_the_override_syntax(tmp_path):
  result = run("mian_jax.main", "--help", tmp_path=tmp_path)
  assert "--[no]show_config" in result.stdout
  assert "--config.<key>=<value>" in result.stdout


@pytest.mark.parametrize("module", ["mian_jax.main", "mian_jax.evaluate",
                                    "mian_jax.prepare"])
def test_show_config_lists_every_key_with_its_value_and_comment(tmp_path, module):
  from configs import synthetic  # noqa: PLC0415

  result = run(module, "--config.train.batch_size=256", "--show_config", tmp_path=tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = [line for line in result.stdout.splitlines() if line and not line.startswith("#")]
  keys = [line.split()[0] for line in lines]
  expected = synthetic.get_config()
  flat = {}
  stack = [("", expected)]
  while stack:
    prefix, node = stack.pop()
    for key, value in node.items():
      if hasattr(value, "items"):
        stack.append((f"{prefix}{key}.", value))
      else:
        flat[f"{prefix}{key}"] = value
  assert sorted(keys) == sorted(flat)
  rows = {line.split()[0]: line for line in lines}
  # overrides applied; comments from the defaults (mian_jax/config_defaults.py) and from
  # configs/synthetic.py; values and comments start in one column each.
  assert re.fullmatch(r"train\.batch_size +256 +# global batch, split over devices \(§4\.3\)",
                      rows["train.batch_size"])
  assert rows["data.synthetic.num_users"].endswith("# users (group_id for gAUC)")
  assert re.fullmatch(r"train\.log_every_steps +200 +# progress line and train metrics",
                      rows["train.log_every_steps"])
  assert rows["model.mlp_dims"].split("#")[0].split(None, 1)[1].strip() == "(32, 8)"
  assert len({line.index(line.split()[1], len(line.split()[0])) for line in lines}) == 1
  assert len({line.index("  # ") for line in lines if "  # " in line
              and len(line.split()[1]) <= 20}) == 1
  assert not (tmp_path / "cache").exists()  # nothing prepared, nothing trained


def test_jax_backend_probes_are_not_logged():
  """On a machine without a TPU, JAX's 'Unable to initialize backend 'tpu'' probe line is
  dropped; JAX's warnings still come through. A filter ahead of cli's sees whether JAX logged
  the probe at all (else the test would pass with nothing to drop)."""
  script = textwrap.dedent("""\
      import logging
      import jax
      from absl import app
      from mian_jax import cli

      def main(argv):
        seen, bridge = [], logging.getLogger("jax._src.xla_bridge")
        bridge.addFilter(lambda record: not seen.append(record.getMessage()))
        cli.init_process()
        print(jax.devices())
        print("probe logged:", any(m.startswith("Unable to initialize backend") for m in seen))
        bridge.warning("CUDA backend failed to initialize")
        bridge.info("Initializing something else")

      app.run(main, flags_parser=cli.parse_flags)
      """)
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  env.update(MIAN_JAX_COMPILATION_CACHE="", JAX_PLATFORMS="")
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "probe logged: True" in result.stdout, (
      "JAX no longer logs 'Unable to initialize backend': cli._no_backend_probes drops nothing")
  assert "Unable to initialize backend" not in result.stderr
  assert "CUDA backend failed to initialize" in result.stderr
  assert "Initializing something else" in result.stderr


# ------------------------------------------------------------- issue 23: faults a user meets

@pytest.mark.parametrize("workdir, state", [("empty", "holds no config.json"),
                                            ("missing", "does not exist")])
def test_evaluate_on_a_workdir_without_a_run_says_so(tmp_path, workdir, state):
  (tmp_path / "empty").mkdir()
  result = run("mian_jax.evaluate", f"--workdir={tmp_path / workdir}", tmp_path=tmp_path,
               config=None)
  assert result.returncode == 2
  assert result.stderr.strip() == (
      f"error: no run in {tmp_path / workdir} (it {state}); pass the --workdir of a training "
      "run (python -m mian_jax.main --config=... --workdir=...)")


def test_a_config_file_with_a_syntax_error_is_named_with_its_line(tmp_path):
  (tmp_path / "broken.py").write_text("from mian_jax import config_defaults\n\n\n"
                                      "def get_config(arg=None):\n  return (\n")
  result = run("mian_jax.main", f"--workdir={tmp_path / 'run'}", tmp_path=tmp_path,
               config=f"{tmp_path / 'broken.py'}:model=din")
  assert result.returncode == 2
  assert result.stderr.strip() == (f"error: {tmp_path / 'broken.py'} line 5: SyntaxError: '(' "
                                   "was never closed")


def test_books_offline_is_one_short_line_and_leaves_no_workdir(tmp_path):
  """No network (a proxy on a closed port): the two files to fetch by hand, each said once."""
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    proxy = f"http://127.0.0.1:{s.getsockname()[1]}"
  env = dict(os.environ, MIAN_JAX_CACHE=str(tmp_path / "cache"), http_proxy=proxy,
             HTTP_PROXY=proxy, no_proxy="", NO_PROXY="")
  result = subprocess.run([sys.executable, "-m", "mian_jax.main", "--config=configs/books.py",
                           f"--workdir={tmp_path / 'books'}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines() if "cannot download" in line]
  assert len(errors) == 1 and errors[0] == result.stderr.strip().splitlines()[-1]
  source = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles"
  hand = "; ".join(f"{source}/{name} -> {tmp_path}/cache/raw/amazon/{name}"
                   for name in ("reviews_Books_5.json.gz", "meta_Books.json.gz"))
  assert re.fullmatch(r"error: cannot download 2 files \([^()]*\); without network access fetch "
                      rf"them by hand and rerun: {re.escape(hand)}", errors[0]), errors[0]
  assert not (tmp_path / "books").exists()


def _mount(*args):
  """Runs mount(8); skips the test where this process may not mount (not root)."""
  if os.geteuid() != 0:
    pytest.skip("mounting a small or read-only file system needs root")
  done = subprocess.run(["mount", *args], capture_output=True, text=True)
  if done.returncode:
    pytest.skip(f"cannot mount here: {done.stderr.strip()}")


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_save_is_said_once(tmp_path):
  disk = tmp_path / "disk"
  disk.mkdir()
  _mount("-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk))
  try:
    result = run("mian_jax.main", f"--workdir={disk / 'run'}", *TINY,
                 "--config.train.num_train_steps=64", tmp_path=tmp_path)
  finally:
    subprocess.run(["umount", "-l", str(disk)], check=True)
  assert result.returncode == 1
  stderr = result.stderr
  assert "Traceback" not in stderr
  lines = [line for line in stderr.splitlines() if "No space left" in line]
  assert lines == [stderr.strip().splitlines()[-1]], stderr[-3000:]
  assert lines[0].startswith("error: disk full: ")


@pytest.mark.slow
def test_a_read_only_workdir_is_one_line_for_evaluate_and_train(tmp_path):
  trained = run("mian_jax.main", f"--workdir={tmp_path / 'run'}", *TINY,
                "--config.train.num_train_steps=4", tmp_path=tmp_path)
  assert trained.returncode == 0, trained.stderr[-2000:]
  view = tmp_path / "read_only"
  view.mkdir()
  _mount("--bind", str(tmp_path / "run"), str(view))
  try:
    subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True)
    results = [run("mian_jax.evaluate", f"--workdir={view}", tmp_path=tmp_path, config=None),
               run("mian_jax.main", f"--workdir={view}", "--config.train.num_train_steps=8",
                   tmp_path=tmp_path, config=None)]
  finally:
    subprocess.run(["umount", "-l", str(view)], check=True)
  for result in results:
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: cannot write {view}/\S+: read-only file system; use a "
                        r"writable --workdir \(or --output\)", last), last


def test_a_collective_that_lost_its_peer_is_one_line_in_a_multi_process_run(monkeypatch, capsys):
  class JaxRuntimeError(RuntimeError):  # the name JAX gives its runtime errors
    pass

  def lost():
    raise JaxRuntimeError("UNKNOWN: Gloo all-reduce failed: [pair.cc:538] Read error "
                          "[127.0.0.1]:21153: Connection reset by peer")

  monkeypatch.setattr(cli.jax, "process_count", lambda: 2)
  with pytest.raises(SystemExit) as exit_info:
    cli.run_or_exit(lost)
  assert str(exit_info.value.code).startswith(
      "error: another process of this distributed run is gone")
  monkeypatch.setattr(cli.jax, "process_count", lambda: 1)  # one process: not a lost peer
  with pytest.raises(JaxRuntimeError):
    cli.run_or_exit(lost)


def test_unawaited_write_tasks_of_a_full_disk_are_not_logged_as_tracebacks():
  import logging as py_logging  # noqa: PLC0415

  full = ValueError("RESOURCE_EXHAUSTED: Error writing \"params/0\" in OCDBT database: "
                    "[os_error_code='28'] No space left on device")
  quiet = cli._quiet_libraries

  def record(name, error, pathname="/x/asyncio/base_events.py"):
    return py_logging.LogRecord(name, py_logging.ERROR, pathname, 1,
                                "Task exception was never retrieved", None,
                                (type(error), error, None))

  assert not quiet(record("asyncio", full))  # the entry point says "disk full" once
  assert quiet(record("asyncio", ValueError("another failure")))  # still shown
  assert quiet(record("mian_jax", full, pathname="/x/mian_jax/train.py"))


def test_tensorstore_calling_into_a_closed_event_loop_is_not_printed(monkeypatch, capsys):
  """After a failed save, tensorstore's callbacks into orbax's closed event loop raise where
  nothing can catch them; the interpreter prints those (sys.unraisablehook), unless dropped."""
  import asyncio  # noqa: PLC0415
  import types  # noqa: PLC0415

  def unraisable(error, obj=None):  # the traceback less this test's frame, as from C
    return types.SimpleNamespace(exc_type=type(error), exc_value=error, object=obj,
                                 exc_traceback=error.__traceback__ and error.__traceback__.tb_next,
                                 err_msg=None)

  loop = asyncio.new_event_loop()
  loop.close()
  with pytest.raises(RuntimeError, match="Event loop is closed") as closed:
    loop.call_soon_threadsafe(print)
  try:
    json.loads("{", object_hook=lambda _: None)  # a frame outside asyncio
  except ValueError as e:
    ours = RuntimeError("Event loop is closed").with_traceback(e.__traceback__)
  printed = []
  monkeypatch.setattr(sys, "unraisablehook", printed.append)
  cli.quiet_library_logs()
  cli.quiet_library_logs()  # installs once
  sys.unraisablehook(unraisable(closed.value))
  assert printed == []
  for shown in (unraisable(ours), unraisable(closed.value, obj="a coroutine"),
                unraisable(ValueError("another failure"))):
    sys.unraisablehook(shown)
  assert len(printed) == 3
