"""MIAN end to end: a NumPy reference of §3.2, padding invariance, ablation switches."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from mian_jax import models
from mian_jax.data import synthetic
from mian_jax.data.pipeline import gather_batch
from tests.helpers import np_softmax, tiny_config


def _setup(**overrides):
  config = tiny_config(**overrides)
  schema, splits = synthetic.generate(config.data.synthetic, config.data.max_seq_len)
  batch = gather_batch(splits["valid"], schema, np.arange(12))
  model = models.create_model(config.model, schema.features)
  params = model.init(jax.random.PRNGKey(0), batch, train=False)["params"]
  return model, params, batch, schema


def _apply(model, params, batch):
  return model.apply({"params": params}, batch, train=False)


def _np_activation_unit(q, keys, mask, p):
  """DIN's local activation unit: Dense -> PReLU -> Dense over [q; k; q - k; q * k]."""
  q = np.broadcast_to(q[:, None], keys.shape)
  x = np.concatenate([q, keys, q - keys, q * keys], -1)
  x = x @ p["mlp"]["Dense_0"]["kernel"] + p["mlp"]["Dense_0"]["bias"]
  x = np.where(x >= 0, x, p["mlp"]["activation_0"]["negative_slope"] * x)
  return np.where(mask, x @ p["score"]["kernel"][:, 0] + p["score"]["bias"][0], 0.0)


@pytest.mark.parametrize("ibim_score,values,behavior,combine", [
    ("additive", "concat", "concat", "project_sum"),
    ("din", "concat_product", "mean", "project_sum"),
    ("bilinear", "concat", "mean", "weighted_concat"),
])
def test_forward_matches_numpy_reference_of_eqs_1_to_17(ibim_score, values, behavior, combine):
  model, params, batch, schema = _setup(**{"model.transformer": "none",
                                           "model.ibim_score": ibim_score,
                                           "model.interaction_values": values,
                                           "model.gim_behavior": behavior,
                                           "model.gim_combine": combine})
  logits, aux = _apply(model, params, batch)
  p = jax.tree.map(np.asarray, params)
  f = schema.features

  def embed(group, inputs, names):
    return np.stack([p["embedding"][group][f"embed_{n}"]["embedding"][inputs[n]] for n in names],
                    -2)

  flat = lambda x: x.reshape(*x.shape[:-2], -1)  # noqa: E731
  e_i = flat(embed("item_embedding", batch["item"], [x.name for x in f.item_fields]))
  mask = np.arange(f.max_seq_len)[None] < batch["hist_len"][:, None]
  e_b = flat(embed("item_embedding", batch["hist"], f.behavior_fields)) * mask[..., None]
  e_u = embed("user_embedding", batch["user"], [x.name for x in f.user_fields])
  e_c = embed("context_embedding", batch["context"], [x.name for x in f.context_fields])

  def pool(values, q, valid=None, per_slot=False, extra=0.0):  # eqs. 7-9, 10-11, 13
    w, b = q["score_kernel"], q["score_bias"]
    s = np.einsum("bnd,nd->bn", values, w) + b if per_slot else values @ w[:, 0] + b
    alpha = np_softmax(np.tanh(s + extra), valid)
    return np.einsum("bn,bnd->bd", alpha, values), alpha

  tile = lambda n: np.repeat(e_i[:, None], n, 1)  # noqa: E731
  query = flat(embed("item_embedding", batch["item"], f.behavior_fields))  # candidate's e_b
  product = values == "concat_product"
  v_b = [tile(f.max_seq_len), e_b] + ([query[:, None] * e_b] if product else [])
  extra = {"additive": lambda: 0.0,                                          # eq. 8
           "bilinear": lambda: np.einsum("bi,ij,btj->bt", e_i, p["ibim_bilinear"], e_b),
           "din": lambda: _np_activation_unit(query, e_b, mask, p["ibim_activation_unit"]),
           }[ibim_score]()
  r_ibim, a_ibim = pool(np.concatenate(v_b, -1), p["ibim_attention"], mask,
                        extra=extra)                                           # eq. 6

  def fields(e, name):  # eqs. 10-13, with (e_i P) * e^j under "concat_product"
    v = [tile(e.shape[1]), e]
    if product:
      v.append((e_i @ p[f"{name}_candidate_projection"]["kernel"])[:, None] * e)
    return pool(np.concatenate(v, -1), p[f"{name}_attention"], per_slot=True)[0]

  r_iuim, r_icim = fields(e_u, "iuim"), fields(e_c, "icim")
  e_b_part = (flat(e_b) if behavior == "concat"
              else e_b.sum(1) / np.maximum(mask.sum(1, keepdims=True), 1))
  parts = [e_i, flat(e_c), e_b_part, flat(e_u), r_ibim, r_iuim, r_icim]      # eq. 14
  g = p["gim"]
  s = np.stack([r @ g[f"score_{l}"]["kernel"][:, 0] + g[f"score_{l}"]["bias"][0]
                for l, r in enumerate(parts)], -1)
  alpha = np_softmax(np.tanh(s))
  if combine == "project_sum":                                                # eq. 15
    r_g = sum(alpha[:, l:l + 1] * (r @ g[f"project_{l}"]["kernel"]) for l, r in enumerate(parts))
  else:
    assert not any(k.startswith("project_") for k in g)
    r_g = np.concatenate([alpha[:, l:l + 1] * r for l, r in enumerate(parts)], -1)
  h = r_g
  for name in ("Dense_0", "Dense_1"):                                         # eq. 16
    h = np.maximum(0, h @ p["mlp"][name]["kernel"] + p["mlp"][name]["bias"])
  ref = h @ p["logit"]["kernel"][:, 0] + p["logit"]["bias"][0]                # eq. 17
  np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(aux["attention"]["ibim"], a_ibim, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux["attention"]["gim"], alpha, rtol=1e-5)
  sq = (e_i**2).sum(-1) + (e_b**2).sum((1, 2)) + (e_u**2).sum((1, 2)) + (e_c**2).sum((1, 2))
  np.testing.assert_allclose(aux["embedding_sq_norm"], sq, rtol=1e-5)


@pytest.mark.parametrize("transformer", ["pre_ln", "post_ln", "none"])
def test_padding_never_changes_the_output(transformer):
  model, params, batch, schema = _setup(**{"model.transformer": transformer})
  rng = np.random.default_rng(0)
  noisy = jax.tree.map(np.copy, batch)
  pad = np.arange(6)[None] >= batch["hist_len"][:, None]
  for name, ids in noisy["hist"].items():  # real ids where padding was
    ids[pad] = rng.integers(2, schema.features.item_field(name).vocab_size, size=pad.sum())
  a_logits, a_aux = _apply(model, params, batch)
  b_logits, b_aux = _apply(model, params, noisy)
  np.testing.assert_allclose(a_logits, b_logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(a_aux["attention"]["ibim"], b_aux["attention"]["ibim"], atol=1e-6)


def test_attention_weights_sum_to_one_over_valid_positions():
  model, params, batch, schema = _setup()
  _, aux = _apply(model, params, batch)
  att = {k: np.asarray(v) for k, v in aux["attention"].items()}
  lengths = batch["hist_len"]
  valid = np.arange(6)[None] < lengths[:, None]
  assert (lengths == 0).any() and (lengths > 0).any()
  np.testing.assert_allclose(att["ibim"].sum(-1), (lengths > 0).astype(float), atol=1e-5)
  assert (att["ibim"][~valid] == 0).all()
  for name, n in (("iuim", 3), ("icim", 4), ("gim", 7)):
    assert att[name].shape == (12, n)
    np.testing.assert_allclose(att[name].sum(-1), 1.0, atol=1e-5)
  assert model.gim_part_names() == ("e_i", "e_c", "e_b", "e_u", "R_ibim", "R_iuim", "R_icim")


@pytest.mark.parametrize("switch,absent,parts", [
    ("use_ibim", {"ibim_attention", "transformer", "position_embedding"}, 6),
    ("use_iuim", {"iuim_attention", "iuim_candidate_projection"}, 6),
    ("use_icim", {"icim_attention", "icim_candidate_projection"}, 6),
    ("use_gim", {"gim"}, None),
])
def test_each_ablation_switch_removes_its_module(switch, absent, parts):
  full_model, full, batch, _ = _setup()
  model, params, _, _ = _setup(**{f"model.{switch}": False})
  assert absent <= set(full) and not absent & set(params)
  assert set(full) - set(params) == absent
  logits, aux = _apply(model, params, batch)
  assert np.isfinite(logits).all()
  if parts is not None:
    assert len(model.gim_part_names()) == parts == aux["attention"]["gim"].shape[1]


def test_transformer_variants_change_the_parameter_tree():
  _, pre, _, _ = _setup()
  _, post, _, _ = _setup(**{"model.transformer": "post_ln"})
  _, none, _, _ = _setup(**{"model.transformer": "none"})
  assert "ln_final" in pre["transformer"] and "ln_final" not in post["transformer"]
  assert "transformer" not in none and "position_embedding" not in none


@pytest.mark.parametrize("override,changed", [
    ({"model.ibim_score_weights": "per_position"}, {"ibim_attention"}),  # W_t: [T, d]
    ({"model.field_score_weights": "shared"}, {"iuim_attention", "icim_attention"}),
    ({"model.gim_behavior": "concat"}, {"gim/project_2", "gim/score_2"}),  # e_b: T x d_b wide
    ({"model.dense_init": "truncated_normal"}, set()),
    ({"model.score_activation": "none"}, set()),
    ({"model.ibim_score": "din"}, {"ibim_activation_unit"}),
    ({"model.interaction_values": "concat"},  # no q * e_b: narrower V, no candidate projection
     {"ibim_attention", "iuim_attention", "icim_attention", "iuim_candidate_projection",
      "icim_candidate_projection",  # and GIM's R_ibim, R_iuim, R_icim (parts 4-6)
      *(f"gim/{m}_{i}" for m in ("score", "project") for i in (4, 5, 6))}),
])
def test_alternative_readings_change_what_they_name(override, changed):
  """Each reading adds, removes or reshapes the parameters of the modules `changed` and no
  others. With the default weights wherever the trees agree, dense_init (an initialiser only)
  is the same function, its kernels within 2 std; score_activation is another function."""
  model, params, batch, _ = _setup()
  alt_model, alt_params, _, _ = _setup(**override)
  flat, alt_flat = (traverse_util.flatten_dict(p, sep="/") for p in (params, alt_params))
  shape = lambda tree, path: getattr(tree.get(path), "shape", None)  # noqa: E731
  differ = {path for path in flat.keys() | alt_flat.keys()
            if shape(flat, path) != shape(alt_flat, path)}
  inside = lambda path, module: path.startswith(f"{module}/")  # noqa: E731
  assert all(any(inside(path, module) for module in changed) for path in differ)  # no others
  assert all(any(inside(path, module) for path in differ) for module in changed)  # each of them
  shared = {path: alt_flat[path] if path in differ else flat[path] for path in alt_flat}
  a = _apply(model, params, batch)[0]
  b = _apply(alt_model, traverse_util.unflatten_dict(shared, sep="/"), batch)[0]
  assert np.isfinite(b).all()
  if "model.dense_init" in override:
    np.testing.assert_array_equal(a, b)
    kernels = [path for path in flat if path.endswith("kernel") and "embedding" not in path]
    bound = 2 * tiny_config().model.init_std
    assert max(np.abs(alt_flat[k]).max() for k in kernels) <= bound
    assert max(np.abs(flat[k]).max() for k in kernels) > 5 * bound  # lecun_normal
  elif "model.score_activation" in override:
    assert not np.allclose(a, b, atol=1e-4)


def test_bilinear_score_is_the_additive_score_plus_e_i_M_h_t():
  """"bilinear" only adds e_i^T M h_t inside eq. 8's tanh: it adds M and nothing else, and with
  M = 0 it is the additive model with the same parameters (here with the Transformer on; the
  NumPy reference above checks the term itself)."""
  model, params, batch, _ = _setup()
  bilinear, bilinear_params, _, _ = _setup(**{"model.ibim_score": "bilinear"})
  m = bilinear_params["ibim_bilinear"]
  assert set(bilinear_params) - set(params) == {"ibim_bilinear"}
  assert jax.tree.structure({**params, "ibim_bilinear": m}) == jax.tree.structure(bilinear_params)
  additive_logits, additive_aux = _apply(model, params, batch)
  zero_m, zero_aux = _apply(bilinear, {**params, "ibim_bilinear": np.zeros_like(m)}, batch)
  np.testing.assert_allclose(zero_m, additive_logits, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(zero_aux["attention"]["ibim"], additive_aux["attention"]["ibim"],
                             atol=1e-7)
  with_m, with_aux = _apply(bilinear, {**params, "ibim_bilinear": m}, batch)
  assert not np.allclose(with_aux["attention"]["ibim"], additive_aux["attention"]["ibim"],
                         atol=1e-4)
  assert not np.allclose(with_m, additive_logits, atol=1e-5)


def _permute_valid_behaviors(batch, seed):
  """Each row's valid behaviours in a random order (the same for every field), padding kept."""
  rng = np.random.default_rng(seed)
  order = np.tile(np.arange(batch["hist"]["item_id"].shape[1]), (len(batch["hist_len"]), 1))
  for row, length in enumerate(batch["hist_len"]):
    order[row, :length] = rng.permutation(length)
  hist = {k: np.take_along_axis(np.asarray(v), order, 1) for k, v in batch["hist"].items()}
  return {**batch, "hist": hist}, order


def test_position_embedding_none_is_order_blind_and_learned_is_not():
  """docs/model.md: without a position embedding self-attention is order-blind. With "none"
  there is no table, and shuffling a user's behaviours only shuffles the IBIM weights (e_b
  enters GIM as a mean, eq. 8's weights are shared); "learned" is "none" plus the table."""
  learned, learned_params, batch, _ = _setup()
  none, none_params, _, _ = _setup(**{"model.position_embedding": "none"})
  assert "position_embedding" in learned_params and "position_embedding" not in none_params
  assert set(learned_params) - set(none_params) == {"position_embedding"}
  shuffled, order = _permute_valid_behaviors(batch, seed=1)
  assert any((order[r, :n] != np.arange(n)).any() and
             len(set(np.asarray(batch["hist"]["item_id"])[r, :n])) > 1
             for r, n in enumerate(batch["hist_len"]))
  logits, aux = _apply(none, none_params, batch)
  shuffled_logits, shuffled_aux = _apply(none, none_params, shuffled)
  np.testing.assert_allclose(shuffled_logits, logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(shuffled_aux["attention"]["ibim"],
                             np.take_along_axis(np.asarray(aux["attention"]["ibim"]), order, 1),
                             atol=1e-6)
  with_table = {**none_params, "position_embedding": learned_params["position_embedding"]}
  assert not np.allclose(_apply(learned, with_table, shuffled)[0],
                         _apply(learned, with_table, batch)[0], atol=1e-5)
  zero_table = {**none_params,
                "position_embedding": np.zeros_like(learned_params["position_embedding"])}
  np.testing.assert_allclose(_apply(learned, zero_table, batch)[0], logits, rtol=1e-6, atol=1e-6)


def test_dropout_only_in_training_and_keyed_by_rng():
  model, params, batch, _ = _setup()
  run = lambda seed: model.apply({"params": params}, batch, train=True,  # noqa: E731
                                 rngs={"dropout": jax.random.PRNGKey(seed)})[0]
  assert not np.allclose(run(0), run(1))
  evaluated = _apply(model, params, batch)[0]  # no dropout rng: dropout would raise
  assert not np.allclose(run(0), evaluated)
  np.testing.assert_array_equal(model.apply({"params": params}, batch, train=False,
                                            rngs={"dropout": jax.random.PRNGKey(0)})[0], evaluated)



@pytest.mark.parametrize("transformer", ["pre_ln", "none"])
def test_history_layout_moves_slots_but_keeps_each_behaviours_recency(transformer):
  """The Transformer (with its position embedding by recency) and the shared eq. 8 score do not
  depend on the slot order, so with e_b entering GIM as a mean the two layouts are the same
  function; with e_b concatenated (eq. 14) they differ, which is what the layout changes."""
  outputs = {}
  for behavior in ("mean", "concat"):
    for layout in ("newest_first", "oldest_first"):
      model, params, batch, _ = _setup(**{"model.transformer": transformer,
                                          "model.gim_behavior": behavior,
                                          "model.history_layout": layout})
      outputs[behavior, layout] = _apply(model, params, batch)
  assert (np.asarray(_setup()[2]["hist_len"]) >= 2).any()
  for layout in ("newest_first", "oldest_first"):  # weights reported in storage order
    np.testing.assert_allclose(outputs["mean", layout][1]["attention"]["ibim"],
                               outputs["mean", "newest_first"][1]["attention"]["ibim"], atol=1e-6)
  np.testing.assert_allclose(outputs["mean", "oldest_first"][0],
                             outputs["mean", "newest_first"][0], rtol=1e-5, atol=1e-6)
  assert not np.allclose(outputs["concat", "oldest_first"][0],
                         outputs["concat", "newest_first"][0], atol=1e-5)


def test_ibim_product_term_uses_the_behavior_embeddings_not_the_transformer_output():
  """With "concat_product", the last d_b entries of R_ibim are sum_t alpha_t (q * e_b^t): the
  candidate meets each behaviour in the embedding space they share, whatever h_t is."""
  model, params, batch, schema = _setup(**{"model.transformer": "pre_ln",
                                           "model.interaction_values": "concat_product"})
  _, state = model.apply({"params": params}, batch, train=False, capture_intermediates=True,
                         mutable=["intermediates"])
  r_ibim, alpha = state["intermediates"]["ibim_attention"]["__call__"][0]
  f = schema.features
  tables = jax.tree.map(np.asarray, params)["embedding"]["item_embedding"]
  flat = lambda x: x.reshape(*x.shape[:-2], -1)  # noqa: E731
  embed = lambda ids: flat(np.stack([tables[f"embed_{n}"]["embedding"][ids[n]]  # noqa: E731
                                     for n in f.behavior_fields], -2))
  mask = np.arange(f.max_seq_len)[None] < batch["hist_len"][:, None]
  e_b = embed(batch["hist"]) * mask[..., None]
  q = embed(batch["item"])
  d_b = e_b.shape[-1]
  np.testing.assert_allclose(np.asarray(r_ibim)[:, -d_b:],
                             np.einsum("bt,btd->bd", np.asarray(alpha), q[:, None] * e_b),
                             rtol=1e-4, atol=1e-7)



@pytest.mark.parametrize("values,weights,activation,ranking_moves", [
    ("concat_product", "shared", "tanh", True),  # the defaults
    ("concat_product", "shared", "none", True),
    ("concat", "per_position", "none", True),
    ("concat", "shared", "tanh", False),
    ("concat", "shared", "none", False),
])
def test_which_ibim_weights_depend_on_the_candidate(values, weights, activation, ranking_moves):
  """docs/model.md, eq. 8: with "concat_product" the pooled value holds q * e_b^t, so the score
  V_t.W holds sum_k w_k q_k e_b,k^t, and a new candidate re-ranks the behaviours. With "concat"
  and one shared W the candidate adds the same e_i.W_i to every score: the ranking over t never
  moves, and the weights do not change at all without tanh (with it, only their spread does).
  Per-position W_t re-rank positions per candidate."""
  model, params, batch, schema = _setup(**{"model.interaction_values": values,
                                           "model.ibim_score_weights": weights,
                                           "model.score_activation": activation})
  # Embeddings at unit scale instead of std 0.02, so that products are not ~1e-4 at init.
  params = {**params, "embedding": jax.tree.map(lambda x: 25 * x, params["embedding"])}
  rng = np.random.default_rng(0)
  other = {**batch, "item": {name: rng.integers(2, schema.features.item_field(name).vocab_size,
                                                size=ids.shape).astype(ids.dtype)
                             for name, ids in batch["item"].items()}}
  lengths = np.asarray(batch["hist_len"])
  assert (lengths >= 3).sum() >= 3
  before, after = (np.asarray(_apply(model, params, b)[1]["attention"]["ibim"])
                   for b in (batch, other))
  moved = [(np.argsort(-x[:n]) != np.argsort(-y[:n])).any()
           for x, y, n in zip(before, after, lengths)]
  assert any(moved) == ranking_moves
  if activation == "none" and not ranking_moves:
    np.testing.assert_allclose(after, before, atol=1e-6)
  else:
    assert np.abs(after - before).max() > 0.01
