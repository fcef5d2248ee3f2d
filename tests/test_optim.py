"""Lazy Adam and row-sparse embedding gradients against dense Adam and dense gradients (its
end-to-end runs, resume and device equivalence: test_train.py, over both optimizers)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mian_jax import config_checks, optim, sharding, steps
from mian_jax.errors import ConfigError
from tests.helpers import tiny_config

LR, B1, B2, EPS = 1e-2, 0.9, 0.999, 1e-8


def _numpy_adam_rows(p, m, v, g, t):
  m = B1 * m + (1 - B1) * g
  v = B2 * v + (1 - B2) * g * g
  update = -LR * (m / (1 - B1**t)) / (np.sqrt(v / (1 - B2**t)) + EPS)
  return p + update, m, v


def test_lazy_adam_on_dense_leaves_is_optax_adam():
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "b": jnp.zeros(3)}
  dense, lazy = optax.adam(LR, b1=B1, b2=B2, eps=EPS), optim.lazy_adam(LR, B1, B2, EPS)
  p_dense, s_dense = params, dense.init(params)
  p_lazy, s_lazy = params, lazy.init(params)
  for _ in range(4):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    u, s_dense = dense.update(grads, s_dense, p_dense)
    p_dense = optax.apply_updates(p_dense, u)
    u, s_lazy = lazy.update(grads, s_lazy, p_lazy)
    p_lazy = optim.apply_updates(p_lazy, u)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               p_dense, p_lazy)


def test_lazy_adam_updates_exactly_the_rows_given():
  rng = np.random.default_rng(1)
  vocab, dim = 8, 3
  table = rng.normal(size=(vocab, dim)).astype(np.float32)
  lazy = optim.lazy_adam(LR, B1, B2, EPS)
  params = {"table": jnp.asarray(table)}
  state = lazy.init(params)
  p, m, v = table.copy(), np.zeros_like(table), np.zeros_like(table)
  # Step 1 touches rows 1 and 4 (slot 2 is padding: index == vocab, dropped); step 2 rows 4, 6.
  for t, (rows, pad) in enumerate([([1, 4], 1), ([4, 6], 0)], start=1):
    g = rng.normal(size=(len(rows) + pad, dim)).astype(np.float32)
    indices = np.asarray(rows + [vocab] * pad, np.int32)
    u, state = lazy.update({"table": optim.IndexedRows(jnp.asarray(indices), jnp.asarray(g))},
                           state, params)
    params = optim.apply_updates(params, u)
    p[rows], m[rows], v[rows] = _numpy_adam_rows(p[rows], m[rows], v[rows], g[:len(rows)], t)
  np.testing.assert_allclose(params["table"], p, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(state.mu["table"], m, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(state.nu["table"], v, rtol=1e-6, atol=1e-10)
  untouched = [0, 2, 3, 5, 7]
  np.testing.assert_array_equal(params["table"][np.array(untouched)], table[untouched])
  assert not np.any(np.asarray(state.mu["table"])[untouched])


def _state_and_batch(model_name, optimizer="adam"):
  config = tiny_config(**{"model.name": model_name, "train.optimizer": optimizer})
  mesh = sharding.create_mesh(jax.devices()[:1])
  run = steps.setup(config, mesh)
  state, batch = run.state, run.train_batches().batch(0)
  # Some behaviours repeat the candidate, so one row is reached through both id arrays.
  batch["hist"]["item_id"][:4, 0] = batch["item"]["item_id"][:4]
  return config, state, sharding.to_global(batch, mesh)


@pytest.mark.parametrize("model_name", ["mian", "deepfm", "din", "dien"])
def test_row_sparse_gradients_are_the_dense_gradients_rows(model_name):
  config, state, batch = _state_and_batch(model_name)
  kwargs = dict(l2_weight=config.train.l2_weight, l2_scope=config.train.l2_scope)
  rng = jax.random.PRNGKey(3)
  (loss, _, _), dense = jax.jit(lambda s, b: steps.loss_and_grads(s, b, rng, **kwargs))(
      state, batch)
  (loss_s, _, _), rows = jax.jit(lambda s, b: steps.loss_and_grads(
      s, b, rng, sparse_embeddings=True, **kwargs))(state, batch)
  assert float(loss_s) == pytest.approx(float(loss), rel=1e-6)
  tables = {t.path for t in optim.find_tables(state.params)}
  assert any(p[-3] == "item_embedding" for p in tables) and any(
      p[-3] == "user_embedding" for p in tables)

  def densify(g, p):
    if isinstance(g, optim.IndexedRows):
      ids = np.asarray(g.indices)
      assert len(set(ids[ids < p.shape[0]])) == int(np.sum(ids < p.shape[0]))  # distinct
      return jnp.zeros_like(p).at[g.indices].add(g.values, mode="drop")
    return g

  rebuilt = jax.tree.map(densify, rows, state.params,
                         is_leaf=lambda x: isinstance(x, optim.IndexedRows))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7),
               rebuilt, dense)


def test_lazy_adam_train_step_moves_only_the_rows_in_the_batch():
  config, state, batch = _state_and_batch("mian", "lazy_adam")
  mesh = sharding.create_mesh(jax.devices()[:1])
  before = jax.device_get(state.params)
  state, metrics = steps.make_train_step(config.train, mesh)(state, batch, jax.random.PRNGKey(1))
  assert np.isfinite(float(metrics["loss"]))
  after = jax.device_get(state.params)
  get = lambda tree: tree["embedding"]["item_embedding"]["embed_item_id"]["embedding"]  # noqa
  hist = np.asarray(batch["hist"]["item_id"])
  used = np.union1d(np.asarray(batch["item"]["item_id"]), hist[hist > 0])  # 0 pads: no gradient
  changed = np.flatnonzero(np.any(get(after) != get(before), axis=-1))
  np.testing.assert_array_equal(changed, used)


def test_lazy_adam_with_l2_on_all_weights_is_refused():
  config = tiny_config(**{"train.optimizer": "lazy_adam", "train.l2_scope": "all_weights"})
  with pytest.raises(ConfigError, match="lazy_adam"):
    config_checks.check_config(config)
  with pytest.raises(ConfigError, match="optimizer"):
    config_checks.check_config(tiny_config(**{"train.optimizer": "sgd"}))


def test_first_occurrence_matches_numpy():
  ids = np.random.default_rng(4).integers(0, 9, 50).astype(np.int32)
  _, first_index, inverse = np.unique(ids, return_index=True, return_inverse=True)
  np.testing.assert_array_equal(optim.first_occurrence(jnp.asarray(ids), 9),
                                first_index[inverse])


def test_clipping_takes_row_sparse_leaves_like_their_dense_gradient():
  rng = np.random.default_rng(0)
  table = rng.normal(size=(5, 3)).astype(np.float32)
  rows = np.array([3, 0, 7])  # 7 >= V: an unused slot with a zero gradient
  values = np.zeros((3, 3), np.float32)
  values[:2] = table[[3, 0]]
  dense_grad = np.zeros((5, 3), np.float32)
  dense_grad[[3, 0]] = table[[3, 0]]
  w = rng.normal(size=(4,)).astype(np.float32)
  clip = optim.clip_by_global_norm(0.5)
  ours, _ = clip.update({"t": optim.IndexedRows(jnp.asarray(rows), jnp.asarray(values)), "w": w},
                        clip.init(None))
  ref, _ = optax.clip_by_global_norm(0.5).update({"t": dense_grad, "w": w}, None)
  np.testing.assert_allclose(np.asarray(ours["t"].values)[:2], np.asarray(ref["t"])[[3, 0]],
                             rtol=1e-6)
  np.testing.assert_allclose(ours["w"], ref["w"], rtol=1e-6)
  small, _ = clip.update({"w": w * 1e-3}, clip.init(None))  # under the norm: unchanged
  np.testing.assert_allclose(small["w"], w * 1e-3, rtol=1e-6)


@pytest.mark.parametrize("name", ["adam", "lazy_adam"])
def test_warmup_scales_the_first_updates_and_then_reaches_the_learning_rate(name):
  config = tiny_config(**{"train.optimizer": name, "train.warmup_steps": 4,
                          "train.learning_rate": LR})
  tx = optim.create_optimizer(config.train)
  schedule = optim.learning_rate_schedule(config.train)
  np.testing.assert_allclose([schedule(i) for i in range(6)],
                             [LR / 4, LR / 2, 3 * LR / 4, LR, LR, LR], rtol=1e-6)
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  sizes = []
  for _ in range(6):  # a constant gradient: Adam's step is then the learning rate itself
    updates, state = tx.update({"w": jnp.ones(3)}, state, params)
    sizes.append(float(-updates["w"][0]))
  np.testing.assert_allclose(sizes, [LR / 4, LR / 2, 3 * LR / 4, LR, LR, LR], rtol=1e-4)
