"""The seven baselines (docs/baselines.md): NumPy references of their distinctive layers, shapes,
padding invariance, row independence, and a few training steps through the real train step."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mian_jax import config_checks, models, optim, sharding, steps
from mian_jax.data import synthetic
from mian_jax.data.pipeline import gather_batch
from mian_jax.errors import ConfigError
from mian_jax.models import base, layers
from mian_jax.models.base import candidate_query
from mian_jax.models.interest import DIEN
from tests.helpers import np_softmax, tiny_config

BASELINES = ("lr", "wide_deep", "dcn", "deepfm", "xdeepfm", "din", "dien")
SEQUENCE_MODELS = ("din", "dien")
INIT = nn.initializers.normal(0.5)  # large enough that every term matters
SMALL = {"model.cin_layer_sizes": (6, 5), "model.attention_mlp_dims": (8, 4),
         "model.gru_dim": 6, "model.aux_mlp_dims": (8,)}


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


@functools.cache
def _setup(name, **overrides):
  config = tiny_config(**{"model.name": name, **SMALL, **overrides})
  schema, splits = synthetic.generate(config.data.synthetic, config.data.max_seq_len)
  batch = gather_batch(splits["valid"], schema, np.arange(12))
  model = models.create_model(config.model, schema.features)
  params = model.init(jax.random.PRNGKey(0), batch, train=False)["params"]
  return model, params, batch, schema, config


@functools.cache
def _eval_fn(model):
  return jax.jit(lambda params, batch: model.apply({"params": params}, batch, train=False))


def _apply(model, params, batch):
  return jax.device_get(_eval_fn(model)(params, batch))


# ----------------------------------------------------------------------------- whole models


@pytest.mark.parametrize("name", BASELINES)
def test_output_shape_finiteness_and_aux(name):
  model, params, batch, schema, _ = _setup(name)
  logits, aux = _apply(model, params, batch)
  assert logits.shape == (12,) and logits.dtype == np.float32 and np.isfinite(logits).all()
  sq = aux["embedding_sq_norm"]
  assert sq.shape == (12,) and np.isfinite(sq).all() and (sq > 0).all()
  assert isinstance(aux["attention"], dict)
  if name in SEQUENCE_MODELS:
    (att,) = aux["attention"].values()
    valid = np.arange(schema.features.max_seq_len)[None] < batch["hist_len"][:, None]
    assert att.shape == valid.shape and (att[~valid] == 0).all()
    if name == "dien":  # eq. 5 is a softmax over valid behaviours
      np.testing.assert_allclose(att.sum(-1), (batch["hist_len"] > 0).astype(float), atol=1e-5)
  assert models.MODELS[name] is type(model)


@pytest.mark.parametrize("name", BASELINES)
def test_padding_never_changes_the_output(name):
  model, params, batch, schema, _ = _setup(name)
  rng = np.random.default_rng(0)
  noisy = jax.tree.map(np.copy, batch)
  pad = np.arange(schema.features.max_seq_len)[None] >= batch["hist_len"][:, None]
  assert pad.any()
  for field, ids in noisy["hist"].items():  # real ids where padding was
    ids[pad] = rng.integers(2, schema.features.item_field(field).vocab_size, size=pad.sum())
  a, a_aux = _apply(model, params, batch)
  b, b_aux = _apply(model, params, noisy)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(a_aux["embedding_sq_norm"], b_aux["embedding_sq_norm"], rtol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6),
               a_aux["attention"], b_aux["attention"])


@pytest.mark.parametrize("name", BASELINES)
def test_a_row_does_not_depend_on_the_other_rows_or_labels(name):
  """A positive and a negative example go through the same function: no statistics are shared
  between rows in evaluation (no batch norm), and labels are never read."""
  model, params, batch, _, _ = _setup(name)
  logits, _ = _apply(model, params, batch)
  perm = np.random.default_rng(1).permutation(12)
  shuffled = jax.tree.map(lambda x: x[perm], batch)
  shuffled["label"] = 1.0 - shuffled["label"]
  np.testing.assert_allclose(_apply(model, params, shuffled)[0], logits[perm], rtol=1e-5,
                             atol=1e-6)
  half = jax.tree.map(lambda x: np.concatenate([x[:6], x[:6]]), batch)  # rows 6.. replaced
  np.testing.assert_allclose(_apply(model, params, half)[0][:6], logits[:6], rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("name", BASELINES)
def test_a_few_train_steps_lower_the_loss_on_a_fixed_batch(name):
  config = tiny_config(**{"model.name": name, **SMALL, "model.dropout_rate": 0.0,
                          "train.learning_rate": 1e-2})
  run = steps.setup(config, sharding.create_mesh(jax.devices()[:1]))
  batch = sharding.to_global(run.train_batches().batch(0), run.mesh)
  state, losses = run.state, []
  for _ in range(6):
    state, metrics = run.train_step(state, batch, jax.random.PRNGKey(1))
    losses.append(float(metrics["loss"]))
  assert np.isfinite(losses).all() and losses[-1] < losses[0], losses


def test_dien_auxiliary_loss_reaches_the_train_step():
  model, params, batch, _, config = _setup("dien")
  batch = dict(batch, weight=np.ones(12, np.float32))
  rngs = {"dropout": jax.random.PRNGKey(3)}

  @jax.jit
  def aux_losses(params):
    run = lambda m, train_: m.apply({"params": params}, batch, train=train_,  # noqa: E731
                                    rngs=rngs)[1]["aux_loss"]
    return (run(model, True), run(model, False), run(model.clone(use_aux_loss=False), True),
            run(model.clone(aux_loss_weight=2.0), True))

  on, evaluating, off, doubled = map(float, aux_losses(params))
  assert on > 0 and evaluating == 0 and off == 0
  assert doubled == pytest.approx(2 * on, rel=1e-5)
  # Through steps.train_step: loss = bce + l2_weight * l2 + aux_loss, and the gradient of the
  # auxiliary loss reaches the interest extractor (through the auxiliary net only).
  state = steps.TrainState.create(apply_fn=model.apply, params=params,
                                  tx=optim.create_optimizer(config.train))
  step = jax.jit(functools.partial(steps.train_step, l2_weight=0.0, l2_scope="none"))
  _, metrics = step(state, batch, jax.random.PRNGKey(3))
  assert float(metrics["loss"]) > float(metrics["bce"]) + 1e-4
  grads = jax.jit(jax.grad(lambda p: model.apply({"params": p}, batch, train=True,
                                                 rngs=rngs)[1]["aux_loss"]))(params)
  assert np.abs(grads["interest_extractor"]["recurrent_kernel"]).sum() > 0
  assert np.abs(grads["mlp"]["Dense_0"]["kernel"]).sum() == 0


def test_dien_negatives_come_from_other_rows_and_valid_positions():
  model, params, batch, _, _ = _setup("dien")
  e = jnp.asarray(np.random.default_rng(0).normal(size=(12, 6, 3)), jnp.float32)
  mask = np.arange(6)[None] < batch["hist_len"][:, None]
  neg, usable = model.apply({"params": params}, batch, e, jnp.asarray(mask),
                            method=lambda m, *a: m._sample_negatives(*a),
                            rngs={"dropout": jax.random.PRNGKey(0)})
  flat = np.asarray(e)[mask]  # every valid behaviour of the batch
  for b, t in zip(*np.nonzero(np.asarray(usable))):
    matches = np.nonzero((np.abs(np.asarray(e) - np.asarray(neg)[b, t]).sum(-1) < 1e-6)
                         & mask)
    assert len(matches[0]) and (matches[0] != b).all()
  assert flat.size and np.asarray(usable).any()


# ----------------------------------------------------------------------------- layers


def test_fm_second_order_is_the_sum_over_field_pairs():
  v = np.random.default_rng(0).normal(size=(3, 5, 4)).astype(np.float32)
  ref = sum((v[:, i] * v[:, j]).sum(-1) for i in range(5) for j in range(i + 1, 5))
  np.testing.assert_allclose(layers.fm_second_order(jnp.asarray(v)), ref, rtol=1e-5, atol=1e-5)


def test_cross_network_matches_eq_3():
  x0 = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
  module = layers.CrossNetwork(3, INIT)
  params = module.init(jax.random.PRNGKey(0), x0)["params"]
  x = x0
  for l in range(3):
    w, b = np.asarray(params[f"kernel_{l}"])[:, 0], np.asarray(params[f"bias_{l}"])
    x = x0 * (x @ w)[:, None] + b + x  # x_0 x_l^T w_l + b_l + x_l
  np.testing.assert_allclose(module.apply({"params": params}, x0), x, rtol=1e-5, atol=1e-5)


def test_cin_matches_eqs_6_and_9():
  x0 = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)  # [B, m, D]
  module = layers.CIN((5, 2), INIT)
  params = module.init(jax.random.PRNGKey(0), x0)["params"]
  b, m, d = x0.shape
  x, pooled = x0, []
  for k, size in enumerate((5, 2)):
    w = np.asarray(params[f"kernel_{k}"]).reshape(x.shape[1], m, size)  # W^{k,h}_{ij}
    new = np.zeros((b, size, d), np.float32)
    for h in range(size):
      for i in range(x.shape[1]):
        for j in range(m):
          new[:, h] += w[i, j, h] * x[:, i] * x0[:, j]
    x = new
    pooled.append(x.sum(-1))
  np.testing.assert_allclose(module.apply({"params": params}, x0), np.concatenate(pooled, -1),
                             rtol=1e-4, atol=1e-4)


def _np_activation_unit(p, q, k, use_dice):
  """DIN eq. 3's scores s_t = MLP([q; k_t; q - k_t; q * k_t]) with one hidden layer: [B, T]."""
  qq = np.repeat(q[:, None], k.shape[1], 1)
  h = np.concatenate([qq, k, qq - k, qq * k], -1) @ p["mlp"]["Dense_0"]["kernel"]
  h = h + p["mlp"]["Dense_0"]["bias"]
  if use_dice:
    alpha = p["mlp"]["activation_0"]["alpha"]
    gate = _sigmoid((h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True)
                                                               + layers.DICE_EPS))
    h = gate * h + (1 - gate) * alpha * h
  else:
    slope = p["mlp"]["activation_0"]["negative_slope"]
    h = np.where(h >= 0, h, slope * h)
  return (h @ p["score"]["kernel"])[..., 0] + p["score"]["bias"][0]


@pytest.mark.parametrize("normalization", [None, "softmax", "scaled_softmax"])
@pytest.mark.parametrize("use_dice", [False, True])
def test_local_activation_unit_matches_din_eq_3(use_dice, normalization):
  """None: the layer's default, the paper's un-normalised weights (what MIAN's ibim_score="din"
  uses); the softmax variants are masked, the scaled one divides by sqrt(key width)."""
  rng = np.random.default_rng(0)
  q = rng.normal(size=(3, 4)).astype(np.float32)
  k = rng.normal(size=(3, 5, 4)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], bool)
  kwargs = {} if normalization is None else {"normalization": normalization}
  module = layers.LocalActivationUnit((6,), INIT, use_dice, **kwargs)
  params = module.init(jax.random.PRNGKey(0), q, k, mask)["params"]
  scores = _np_activation_unit(jax.tree.map(np.asarray, params), q, k, use_dice)
  ref = {None: np.where(mask, scores, 0), "softmax": np_softmax(scores, mask),
         "scaled_softmax": np_softmax(scores / 2.0, mask)}[normalization]  # sqrt(4) = 2
  out = np.asarray(module.apply({"params": params}, q, k, mask))
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(out[~mask], 0)  # padding and the empty history (row 2)
  if normalization is None:
    assert not np.allclose(out[1].sum(), 1.0)  # not softmax-normalised
  else:
    np.testing.assert_allclose(out.sum(-1), [1, 1, 0], atol=1e-6)
  k2 = np.where(mask[..., None], k, rng.normal(size=k.shape)).astype(np.float32)
  np.testing.assert_allclose(module.apply({"params": params}, q, k2, mask), out, rtol=1e-6)


@pytest.mark.parametrize("normalization", ["none", "softmax", "scaled_softmax"])
def test_local_activation_unit_gradient_is_finite_for_an_empty_history(normalization):
  rng = np.random.default_rng(1)
  q = rng.normal(size=(2, 4)).astype(np.float32)
  k = rng.normal(size=(2, 3, 4)).astype(np.float32)
  mask = np.array([[1, 1, 0], [0, 0, 0]], bool)
  module = layers.LocalActivationUnit((6,), INIT, normalization=normalization)
  params = module.init(jax.random.PRNGKey(0), q, k, mask)["params"]
  loss = lambda p, q: jnp.sum(module.apply({"params": p}, q, k, mask) ** 2)  # noqa: E731
  grads = jax.grad(loss, argnums=(0, 1))(params, q)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  np.testing.assert_array_equal(grads[1][1], 0)  # the empty row's query gets no gradient


def _np_gru(x, mask, p, attention=None):
  """DIEN eq. 1 (and eqs. 6-7 with attention), step by step, state frozen on padding."""
  w, bias, u = p["input"]["kernel"], p["input"]["bias"], p["recurrent_kernel"]
  hd = u.shape[0]
  h = np.zeros((x.shape[0], hd), np.float32)
  outs = []
  for t in range(x.shape[1]):
    xp = x[:, t] @ w + bias
    hp = h @ u
    upd = _sigmoid(xp[:, :hd] + hp[:, :hd])
    reset = _sigmoid(xp[:, hd:2 * hd] + hp[:, hd:2 * hd])
    cand = np.tanh(xp[:, 2 * hd:] + reset * hp[:, 2 * hd:])
    if attention is not None:
      upd = attention[:, t:t + 1] * upd
    new = (1 - upd) * h + upd * cand
    h = np.where(mask[:, t:t + 1], new, h)
    outs.append(h * mask[:, t:t + 1])
  return np.stack(outs, 1), h


@pytest.mark.parametrize("unroll", [False, True])
@pytest.mark.parametrize("augru", [False, True])
def test_gru_and_augru_match_dien_eqs_1_6_7_and_freeze_on_padding(augru, unroll):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 5, 4)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], bool)
  att = rng.uniform(size=(3, 5)).astype(np.float32) if augru else None
  module = layers.GRU(6, INIT, unroll=unroll)
  params = module.init(jax.random.PRNGKey(0), x, mask, att)["params"]
  outs, final = module.apply({"params": params}, x, mask, att)
  ref_outs, ref_final = _np_gru(x, mask, jax.tree.map(np.asarray, params), att)
  np.testing.assert_allclose(outs, ref_outs, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(final, ref_final, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(final[0], outs[0, 2], rtol=1e-6)  # state at the last valid step
  np.testing.assert_array_equal(final[2], 0)
  x2 = x.copy()
  x2[~mask] = rng.normal(size=(~mask).sum() * 4).reshape(-1, 4)
  np.testing.assert_allclose(module.apply({"params": params}, x2, mask, att)[1], final,
                             rtol=1e-6)


def test_sequence_pooling_mean_and_sum_over_valid_positions():
  hist = np.random.default_rng(0).normal(size=(2, 3, 2, 4)).astype(np.float32)
  mask = np.array([[1, 1, 0], [0, 0, 0]], bool)
  hist = hist * mask[..., None, None]
  np.testing.assert_allclose(layers.pool_sequence(hist, mask, "sum"), hist.sum(1), rtol=1e-6)
  mean = layers.pool_sequence(hist, mask, "mean")
  np.testing.assert_allclose(mean[0], hist[0, :2].mean(0), rtol=1e-6)
  np.testing.assert_array_equal(mean[1], 0)


def test_dien_runs_its_grus_from_the_oldest_to_the_newest_behavior():
  model, params, batch, schema, _ = _setup("dien")
  _, state = model.apply({"params": params}, batch, train=False, capture_intermediates=True,
                         mutable=["intermediates"])
  states = np.asarray(state["intermediates"]["interest_extractor"]["__call__"][0][0])
  p = jax.tree.map(np.asarray, params)
  f = schema.features
  lengths = np.asarray(batch["hist_len"])
  mask = np.arange(f.max_seq_len)[None] < lengths[:, None]
  assert (lengths >= 2).any()
  tables = p["embedding"]["item_embedding"]

  def behaviors(order):  # [B, T, d_b] with each row's valid behaviours in `order`
    ids = {n: np.asarray(batch["hist"][n]) for n in f.behavior_fields}
    if order == "oldest_first":  # stored newest first (docs/data.md)
      ids = {n: np.asarray(layers.reverse_valid(jnp.asarray(v), lengths)) for n, v in ids.items()}
    e = np.concatenate([tables[f"embed_{n}"]["embedding"][ids[n]] for n in f.behavior_fields], -1)
    return e * mask[..., None]

  gru = layers.GRU(SMALL["model.gru_dim"], INIT, unroll=True)
  run = lambda x: np.asarray(gru.apply({"params": params["interest_extractor"]}, x, mask)[0])  # noqa: E731
  np.testing.assert_allclose(states, run(behaviors("oldest_first")), rtol=1e-5, atol=1e-6)
  assert not np.allclose(states, run(behaviors("newest_first")), atol=1e-4)


# ----------------------------------------------------------------------------- DIN/DIEN options
# model.baseline_inputs ("reference" | "paper") and model.din_attention_norm.

PAPER = {"model.baseline_inputs": "paper", "model.din_attention_norm": "none"}


class _DINBeforeTheSwitches(base.DeepModel):
  """DIN as it was before `baseline_inputs` and `din_attention_norm`, verbatim."""
  attention_mlp_dims: tuple[int, ...] = (36,)
  use_dice: bool = False

  @nn.compact
  def __call__(self, batch, *, train: bool):
    kernel_init = self.kernel_init()
    e = self.embed(batch)
    keys = layers.flatten_fields(e.hist)
    query = candidate_query(self.features, e.item)
    weights = layers.LocalActivationUnit(self.attention_mlp_dims, kernel_init, self.use_dice,
                                         name="activation_unit")(query, keys, e.mask)
    interest = jnp.einsum("bt,btd->bd", weights, keys)
    parts = [layers.flatten_fields(x) for x in (e.user,) if x is not None]
    parts += [interest, layers.flatten_fields(e.item)]
    parts += [layers.flatten_fields(x) for x in (e.context,) if x is not None]
    h = layers.MLP(self.mlp_dims, self.dropout_rate, kernel_init, self.dropout_rng,
                   "dice" if self.use_dice else "prelu", name="mlp")(jnp.concatenate(parts, -1),
                                                                     deterministic=not train)
    logits = nn.Dense(1, kernel_init=kernel_init, name="logit")(h)[:, 0]
    return logits.astype(jnp.float32), {"attention": {"din": weights},
                                        "embedding_sq_norm": e.sq_norm}


class _DIENBeforeTheSwitches(DIEN):
  """DIEN's forward pass (evaluation) as it was before `baseline_inputs`, verbatim."""

  @nn.compact
  def __call__(self, batch, *, train: bool):
    f = self.features
    kernel_init = self.kernel_init()
    batch = {**batch, "hist": {k: layers.reverse_valid(v, batch["hist_len"])
                               for k, v in batch["hist"].items()}}
    e = self.embed(batch)
    behaviors = layers.flatten_fields(e.hist)
    states, _ = layers.GRU(self.gru_dim, kernel_init, unroll=not train,
                           name="interest_extractor")(behaviors, e.mask)
    e_a = candidate_query(f, e.item)
    w = self.param("attention_kernel", kernel_init, (self.gru_dim, e_a.shape[-1]))
    attention = layers.masked_softmax(jnp.einsum("bth,hd,bd->bt", states, w, e_a), e.mask)
    _, interest = layers.GRU(self.gru_dim, kernel_init, unroll=not train,
                             name="interest_evolving")(states, e.mask, attention)
    parts = [layers.flatten_fields(x) for x in (e.user,) if x is not None]
    parts += [layers.flatten_fields(e.item), interest]
    parts += [layers.flatten_fields(x) for x in (e.context,) if x is not None]
    h = layers.MLP(self.mlp_dims, self.dropout_rate, kernel_init, self.dropout_rng,
                   "dice" if self.use_dice else "prelu", name="mlp")(jnp.concatenate(parts, -1),
                                                                     deterministic=not train)
    logits = nn.Dense(1, kernel_init=kernel_init, name="logit")(h)[:, 0]
    if self.use_aux_loss and self.is_initializing():
      self._aux_loss(batch, states, behaviors, e.mask, kernel_init, train)
    return logits.astype(jnp.float32), {}


def test_the_defaults_are_the_authors_code():
  model, *_ = _setup("din")
  assert (model.baseline_inputs, model.din_attention_norm) == ("reference", "scaled_softmax")
  assert _setup("dien")[0].baseline_inputs == "reference"


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_paper_inputs_are_bit_identical_to_the_model_before_the_switches(name):
  model, params, batch, _, _ = _setup(name, **PAPER)
  old_cls = {"din": _DINBeforeTheSwitches, "dien": _DIENBeforeTheSwitches}[name]
  kwargs = {k: getattr(model, k) for k in ("embed_dim", "mlp_dims", "dropout_rate",
                                            "dropout_rng", "init_std", "dense_init",
                                            "numeric_embedding", "use_dice")}
  extra = ({"attention_mlp_dims": model.attention_mlp_dims} if name == "din" else
           {k: getattr(model, k) for k in ("gru_dim", "use_aux_loss", "aux_loss_weight",
                                                "aux_mlp_dims", "baseline_inputs")})
  old = old_cls(features=model.features, **kwargs, **extra)
  old_params = old.init(jax.random.PRNGKey(0), batch, train=False)["params"]
  assert jax.tree.structure(old_params) == jax.tree.structure(params)  # checkpoints restore
  jax.tree.map(np.testing.assert_array_equal, old_params, params)  # the same initialisation
  new_logits = _apply(model, params, batch)[0]
  old_logits = jax.device_get(jax.jit(lambda p, b: old.apply({"params": p}, b, train=False)[0])(
      params, batch))
  np.testing.assert_array_equal(new_logits, old_logits)


def _mlp_input_and_embeddings(model, params, batch):
  """The final MLP's input [B, width], the FieldEmbeddings and (DIEN) h'_T, captured."""
  seen = {}

  def capture(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    path = context.module.scope.path
    if context.method_name == "__call__" and path in (("mlp",), ("embedding",),
                                                      ("interest_evolving",)):
      seen[path[0]] = args[0] if path == ("mlp",) else out
    return out

  with nn.intercept_methods(capture):
    _, aux = model.apply({"params": params}, batch, train=False)
  return seen, aux


@pytest.mark.parametrize("name", ["din", "dien"])
@pytest.mark.parametrize("inputs", ["reference", "paper"])
def test_din_and_dien_mlp_inputs_against_numpy(name, inputs):
  """The MLP input against NumPy. DIN: [e_u; v_U; e_i; e_c] (+ v_U * q), v_U = sum_t a_t e_b^t;
  DIEN: [e_u; e_i; h'_T; e_c] (+ s; s * q), s = sum of valid e_b^t (q: the candidate's e_b)."""
  model, params, batch, schema, _ = _setup(name, **{"model.baseline_inputs": inputs})
  seen, aux = _mlp_input_and_embeddings(model, params, batch)
  e = jax.tree.map(np.asarray, seen["embedding"])
  flat = lambda x: x.reshape(x.shape[0], -1)  # noqa: E731
  f = schema.features
  names = [x.name for x in f.item_fields]
  q = flat(e.item[:, [names.index(n) for n in f.behavior_fields]])
  keys = e.hist.reshape(*e.hist.shape[:2], -1)  # [B, T, d_b]
  if name == "din":
    interest = np.einsum("bt,btd->bd", np.asarray(aux["attention"]["din"]), keys)
    expected = [flat(e.user), interest, flat(e.item), flat(e.context)]
    expected += [interest * q] if inputs == "reference" else []
  else:
    valid = np.arange(f.max_seq_len)[None] < np.asarray(batch["hist_len"])[:, None]
    history_sum = (keys * valid[..., None]).sum(1)
    final_state = np.asarray(seen["interest_evolving"][1])
    expected = [flat(e.user), flat(e.item), final_state, flat(e.context)]
    expected += [history_sum, history_sum * q] if inputs == "reference" else []
  np.testing.assert_allclose(seen["mlp"], np.concatenate(expected, -1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", ["none", "softmax", "scaled_softmax"])
@pytest.mark.parametrize("inputs", ["reference", "paper"])
def test_din_options_padding_invariance_and_normalised_weights(inputs, norm):
  overrides = {"model.baseline_inputs": inputs, "model.din_attention_norm": norm}
  model, params, batch, schema, _ = _setup("din", **overrides)
  rng = np.random.default_rng(0)
  noisy = jax.tree.map(np.copy, batch)
  pad = np.arange(schema.features.max_seq_len)[None] >= batch["hist_len"][:, None]
  for field, ids in noisy["hist"].items():
    ids[pad] = rng.integers(2, schema.features.item_field(field).vocab_size, size=pad.sum())
  a, a_aux = _apply(model, params, batch)
  b, b_aux = _apply(model, params, noisy)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  weights = a_aux["attention"]["din"]
  np.testing.assert_allclose(b_aux["attention"]["din"], weights, atol=1e-6)
  assert (weights[pad] == 0).all()
  if norm != "none":
    np.testing.assert_allclose(weights.sum(-1), batch["hist_len"] > 0, atol=1e-5)


@pytest.mark.parametrize("overrides", [
    {"model.din_attention_norm": "none"}, {"model.din_attention_norm": "softmax"}, {}, PAPER])
@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_an_empty_history_gives_finite_outputs_and_gradients(name, overrides):
  model, params, batch, _, _ = _setup(name, **overrides)
  batch = dict(batch, hist_len=np.where(np.arange(12) < 4, 0, batch["hist_len"]))
  logits, aux = _apply(model, params, batch)
  assert np.isfinite(logits).all()
  (weights,) = aux["attention"].values()
  np.testing.assert_array_equal(weights[:4], 0)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(
      {"params": p}, batch, train=True, rngs={"dropout": jax.random.PRNGKey(0)})[0])))(params)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("key", ["model.baseline_inputs", "model.din_attention_norm"])
def test_a_bad_option_is_a_one_line_config_error(key):
  config = tiny_config(**{"model.name": "din", key: "softmx"})
  with pytest.raises(ConfigError, match=rf"^config\.{key}='softmx' is not one of \("):
    config_checks.check_config(config)
  with pytest.raises(ConfigError, match=rf"^config\.{key}='softmx'"):
    models.create_model(config.model, _setup("din")[3].features)
