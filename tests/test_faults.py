"""The fault suite's harness (benchmarks/faults.py): its classification on known outputs, and three
of its fastest probes through the real entry points."""

import pytest

from benchmarks import faults


def _seen(returncode, stderr="", stdout="", **observed):
  return faults.Observed(faults.Proc(returncode, stdout, stderr, 1.0), **observed)


@pytest.mark.slow
def test_classification_of_known_outputs_and_of_three_real_probes(tmp_path):
  fail = faults.Expect("fail", "one line naming the key", r"batch_size")
  succeed = faults.Expect("succeed", "exit 0")
  stop = faults.Expect("stop", "exit 130", r"SIGINT", status=130)
  traceback = ("I1207 train.py:1] step 1\nTraceback (most recent call last):\n  File \"x.py\", "
               "line 1, in <module>\nKeyError: 'item.price'\n")
  cases = [
      (fail, _seen(1, traceback), faults.TRACEBACK),
      (fail, _seen(2, "error: config.train.batch_size must be > 0, got -4\n"), faults.CLEAR),
      (fail, _seen(2, "error: something went wrong\n"), faults.MISLEADING),
      (fail, _seen(0, "I1207 wrote scores\n"), faults.SILENT),
      (fail, _seen(-11, "Fatal Python error: Segmentation fault\n"), faults.UNCLEAR),
      (fail, _seen(2, "error: " + "x" * faults.MAX_MESSAGE_CHARS + " batch_size\n"),
       faults.UNCLEAR),
      (fail, _seen(None, "I1207 step 3\n"), faults.HANG),
      (succeed, _seen(0, lost=("eval/test_metrics.json",)), faults.LOST),
      (succeed, _seen(0, problem="same checksum"), faults.SILENT),
      (succeed, _seen(0, "done\n"), faults.CORRECT),
      (succeed, _seen(0, logs=traceback), faults.TRACEBACK),
      (stop, _seen(130, "stopped: stopped by SIGINT at step 8 after saving a checkpoint\n"),
       faults.CORRECT),
      (stop, _seen(130, "stopped by SIGINT\n", problem="no checkpoint saved"), faults.SILENT),
      (faults.Expect("warn", "a warning", r"float"), _seen(0, "W1207 hour holds floats\n",
                                                            problem="300 unseen"), faults.CORRECT),
  ]
  for expect, seen, outcome in cases:
    assert faults.classify(expect, seen)[0] == outcome, (expect, seen)
  orphaned = _seen(143, "error: stopped\n")
  orphaned.proc.orphans = ("pid 12 python -m mian_jax.main",)
  assert faults.classify(stop, orphaned)[0] == faults.HANG
  assert not faults.as_expected(fail, faults.SILENT) and faults.as_expected(fail, faults.CLEAR)

  # The probes themselves: each is a one-line error today, and must be classified so.
  names = {"main: unknown config key", "launch.local: no entry point arguments",
           "prepare: an empty (0-byte) CSV"}
  probes = [p for p in faults.PROBES if p.name in names]
  assert len(probes) == 3 and not any(p.needs_run for p in probes)
  base = faults.make_base(str(tmp_path / "root"))
  rows = faults.run_all(probes, base, str(tmp_path), jobs=1)
  assert [(r.outcome, r.as_expected) for r in rows] == [(faults.CLEAR, True)] * 3, rows
  message = {r.probe: r.message for r in rows}["main: unknown config key"]
  assert "did you mean train.batch_size" in message
