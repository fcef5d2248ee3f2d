"""Long streams of asynchronously dispatched train steps on two CPU devices (issue 14).

XLA:CPU (jaxlib 0.10.2) deadlocks once more than 32 runs of a program with collectives are in
flight per device while its client thread pool has fewer than two threads per device: the
launch of run 33 blocks one pool thread on the device's in-flight semaphore, the oldest run of
the other device blocks the other thread in its all-reduce / all-gather, and the run it waits
for has no thread left (docs/performance.md, "DIN hung with two CPU devices").
`steps.make_train_step` therefore keeps at most `steps.MAX_STEPS_IN_FLIGHT_ON_CPU` train steps
unfinished on a mesh of several CPU devices (`steps.BoundedStep`).

The steps run in a child process (this module run as a script) with 2 CPU devices and NPROC=2,
which sizes XLA's client thread pool to 2 threads, as on the 2-core machine that hung, whatever
this machine's core count. A stream that stops making progress makes the child print "stuck"
and exit with status STUCK (a deadlock would otherwise abort it only after XLA's 40 s).

  python -m tests.test_async_steps models [max_in_flight [din,mian,...]]  # 0: unbounded
  python -m tests.test_async_steps toy                      # bounded toy step, then unbounded
"""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

pytestmark = pytest.mark.slow  # real runs, several processes or devices: `pytest -m slow`

STUCK = 3  # exit status of a child whose stream stopped making progress
NUM_STEPS = 128  # per model, never waited for: unbounded, 6 of the 8 models deadlock by ~80
# The last two flags make XLA compile the 8 train steps about 4x faster (slower code); the
# deadlock is in the runtime, whatever the generated code.
CHILD_ENV = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2 "
                          "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false",
             "JAX_PLATFORMS": "cpu", "NPROC": "2"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(*args: str, timeout: float) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "tests.test_async_steps", *args], cwd=REPO,
                        env={**os.environ, **CHILD_ENV}, capture_output=True, text=True,
                        timeout=timeout, check=False)


def _report(result: subprocess.CompletedProcess) -> str:
  return f"exit status {result.returncode}\n{result.stdout}\n{result.stderr[-3000:]}"


def test_every_model_survives_a_long_stream_of_async_steps_on_two_cpu_devices():
  from mian_jax import models, steps  # noqa: PLC0415
  result = _child("models", timeout=600)
  assert result.returncode == 0, _report(result)
  rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  assert sorted(r["model"] for r in rows) == sorted(models.MODELS), _report(result)
  for row in rows:
    assert row["devices"] == 2 and row["max_in_flight"] == steps.MAX_STEPS_IN_FLIGHT_ON_CPU, row
    assert row["steps"] == NUM_STEPS + 1 and row["loss"] == row["loss"], row  # not NaN


def test_the_bound_is_what_keeps_a_two_device_cpu_step_alive():
  # The same toy step (an all-reduce of its gradient, like a train step) first bounded by
  # steps.BoundedStep, then unbounded: the bounded stream ends, the unbounded one deadlocks.
  result = _child("toy", timeout=300)
  assert "bounded: done" in result.stdout, _report(result)
  assert result.returncode == STUCK and "stuck: unbounded" in result.stdout, (
      "the unbounded toy stream no longer deadlocks XLA:CPU; if a newer jaxlib fixed it, "
      "steps.MAX_STEPS_IN_FLIGHT_ON_CPU and docs/performance.md need revisiting\n"
      + _report(result))


# ----------------------------------------------------------------------------- the child


class _Watchdog:
  """Ends the process with status STUCK when an armed stream makes no progress for `seconds`."""

  def __init__(self, seconds: float):
    self.seconds, self.label, self.count, self.last = seconds, None, 0, 0.0
    threading.Thread(target=self._watch, daemon=True).start()

  def arm(self, label: str) -> None:
    self.label, self.count, self.last = label, 0, time.monotonic()

  def tick(self, count: int) -> None:
    self.count, self.last = count, time.monotonic()

  def disarm(self) -> None:
    self.label = None

  def _watch(self) -> None:
    while True:
      time.sleep(0.1)
      if self.label is not None and time.monotonic() - self.last > self.seconds:
        print(f"stuck: {self.label} after {self.count} dispatched steps", flush=True)
        os._exit(STUCK)  # the deadlocked XLA threads cannot be joined


class _FixedParams:
  """A model whose `init` returns `params`; its `apply` is the model's."""

  def __init__(self, model, params):
    self.apply, self.params = model.apply, params

  def init(self, *args, **kwargs):
    return {"params": self.params}


def _without_compiling_init(create_train_state):
  """`steps.create_train_state` on random parameters of the shapes `model.init` gives, which
  only traces `model.init`: XLA compiles MIAN's init on two devices slower than its step."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  def create(model, tx, batch, rng, *args, **kwargs):
    shapes = jax.eval_shape(
        lambda: model.init({"params": rng, "dropout": rng}, batch, train=False)["params"])
    draw = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.05 * draw.standard_normal(s.shape)).astype(s.dtype),
                          shapes)
    return create_train_state(_FixedParams(model, params), tx, batch, rng, *args, **kwargs)

  return create


def _every_model(max_in_flight: int | None, names: list[str]) -> None:
  import jax  # noqa: PLC0415

  from mian_jax import models, sharding, steps  # noqa: PLC0415
  from tests.helpers import tiny_config  # noqa: PLC0415

  steps.create_train_state = _without_compiling_init(steps.create_train_state)  # for setup
  watchdog = _Watchdog(seconds=10.0)
  for name in names or sorted(models.MODELS):
    # DIN with lazy Adam is the pair that hung in benchmarks/throughput.py; dense Adam, a
    # smaller program to compile, deadlocks alike (all-reduce of the gradients).
    optimizer = "lazy_adam" if name == "din" else "adam"
    config = tiny_config(**{"model.name": name, "train.optimizer": optimizer})
    start = time.perf_counter()
    run = steps.setup(config, verify_data=False)
    setup_s = time.perf_counter() - start
    step = run.train_step
    if max_in_flight is not None:
      jitted = step.step if isinstance(step, steps.BoundedStep) else step
      step = steps.bound_in_flight(jitted, run.mesh, max_in_flight)
    batches = [sharding.pack_to_global(run.train_batches().batch(s), run.mesh)
               for s in range(4)]
    rng = jax.random.PRNGKey(1)
    start = time.perf_counter()
    state, metrics = step(run.state, batches[0], rng)  # compiles
    jax.block_until_ready(metrics)
    compile_s, start = time.perf_counter() - start, time.perf_counter()
    watchdog.arm(name)
    for i in range(NUM_STEPS):
      state, metrics = step(state, batches[i % len(batches)], rng)  # never waited for here
      watchdog.tick(i + 1)
    loss = float(metrics["loss"])
    watchdog.disarm()
    times = {"setup_s": setup_s, "first_step_s": compile_s, "stream_s": time.perf_counter() - start}
    print(json.dumps({"model": name, "optimizer": optimizer, "steps": int(state.step),
                      "loss": loss, "devices": len(run.mesh.local_devices),
                      "max_in_flight": step.limit if isinstance(step, steps.BoundedStep)
                      else 0, **{k: round(v, 2) for k, v in times.items()}}), flush=True)


def _toy() -> None:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: PLC0415

  from mian_jax import sharding, steps  # noqa: PLC0415

  mesh = sharding.create_mesh()
  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

  def step(w, x):  # least squares towards 0: replicated w, x sharded by rows
    grad = x.T @ (x @ w) / x.shape[0]  # XLA all-reduces the two halves' sums
    return w - 1e-3 * grad, jnp.mean(grad)

  jitted = jax.jit(step, in_shardings=(replicated, data), out_shardings=(replicated, replicated),
                   donate_argnums=(0,))
  x = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (256, 256)), data)
  watchdog = _Watchdog(seconds=2.0)
  for label, fn in (("bounded", steps.BoundedStep(jitted, steps.MAX_STEPS_IN_FLIGHT_ON_CPU)),
                    ("unbounded", jitted)):
    w = jax.device_put(jnp.ones((256, 256)), replicated)
    jax.block_until_ready(fn(jax.device_put(jnp.ones((256, 256)), replicated), x))  # compiles
    watchdog.arm(label)
    for i in range(2000):  # unbounded, it deadlocks after about 40 (later on a busy machine)
      w, metric = fn(w, x)
      watchdog.tick(i + 1)
    jax.block_until_ready(metric)
    watchdog.disarm()
    print(f"{label}: done", flush=True)


if __name__ == "__main__":
  import jax  # noqa: E402  (after CHILD_ENV's XLA_FLAGS, set by the parent)

  jax.config.update("jax_compilation_cache_dir",
                    os.path.join(os.path.expanduser("~"), ".cache", "mian_jax_test_xla"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  if sys.argv[1] == "models":
    _every_model(int(sys.argv[2]) if len(sys.argv) > 2 else None,
                 sys.argv[3].split(",") if len(sys.argv) > 3 else [])
  else:
    _toy()
