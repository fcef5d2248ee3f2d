"""Shared layers against NumPy references of the paper's equations."""

import typing

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mian_jax.models import layers
from tests.helpers import np_softmax

INIT = nn.initializers.normal(0.5)  # large enough that every term matters


def np_layer_norm(x, p, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def test_masked_softmax_sums_to_one_over_valid_and_zero_when_empty():
  scores = jnp.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
  mask = jnp.array([[True, True, False], [False, False, False]])
  out = np.asarray(layers.masked_softmax(scores, mask))
  np.testing.assert_allclose(out[0], np_softmax(np.array([1.0, 2.0, 3.0]), np.array(mask[0])),
                             rtol=1e-6)
  assert out[0, 2] == 0 and out[0].sum() == pytest.approx(1.0)
  np.testing.assert_array_equal(out[1], 0.0)


@pytest.mark.parametrize("per_slot", [True, False])
@pytest.mark.parametrize("activation", ["tanh", "none"])
def test_attention_pool_matches_eqs_7_to_9(per_slot, activation):
  rng = np.random.default_rng(0)
  values = rng.normal(size=(3, 5, 4)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], bool)
  extra = rng.normal(size=(3, 5)).astype(np.float32)
  module = layers.AttentionPool(per_slot, INIT, activation)
  params = module.init(jax.random.PRNGKey(0), values, mask, extra)
  pooled, alpha = module.apply(params, values, mask, extra)
  w = np.asarray(params["params"]["score_kernel"])
  b = np.asarray(params["params"]["score_bias"])
  scores = (np.einsum("bnd,nd->bn", values, w) if per_slot else values @ w[:, 0]) + b + extra
  scores = np.tanh(scores) if activation == "tanh" else scores
  ref_alpha = np_softmax(scores, mask)
  np.testing.assert_allclose(alpha, ref_alpha, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(pooled, np.einsum("bn,bnd->bd", ref_alpha, values), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(alpha).sum(-1), [1, 1, 0], atol=1e-6)


@pytest.mark.parametrize("combine", ["project_sum", "weighted_concat"])
def test_global_attention_matches_eqs_14_15(combine):
  rng = np.random.default_rng(1)
  parts = [rng.normal(size=(2, d)).astype(np.float32) for d in (3, 5, 4)]
  module = layers.GlobalAttention(combine, 6, INIT)
  params = module.init(jax.random.PRNGKey(1), parts)
  out, alpha = module.apply(params, parts)
  p = params["params"]
  scores = np.stack([r @ np.asarray(p[f"score_{l}"]["kernel"])[:, 0] + p[f"score_{l}"]["bias"][0]
                     for l, r in enumerate(parts)], -1)
  ref_alpha = np_softmax(np.tanh(scores))
  np.testing.assert_allclose(alpha, ref_alpha, rtol=1e-5)
  if combine == "project_sum":
    ref = sum(ref_alpha[:, l:l + 1] * (r @ np.asarray(p[f"project_{l}"]["kernel"]))
              for l, r in enumerate(parts))
  else:
    ref = np.concatenate([ref_alpha[:, l:l + 1] * r for l, r in enumerate(parts)], -1)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def np_attention(x, mask, p):
  """Eq. (4) with padded keys masked, in NumPy, using Flax's parameter layout."""
  q, k, v = (np.einsum("btd,dhk->bthk", x, p[n]["kernel"]) + p[n]["bias"]
             for n in ("query", "key", "value"))
  logits = np.einsum("bqhk,bthk->bhqt", q, k) / np.sqrt(q.shape[-1])
  pair = mask[:, None, :, None] & mask[:, None, None, :]
  logits = np.where(pair, logits, np.finfo(np.float32).min)
  weights = np_softmax(logits)
  heads = np.einsum("bhqt,bthk->bqhk", weights, v)
  return np.einsum("bqhk,hkd->bqd", heads, p["out"]["kernel"]) + p["out"]["bias"]


def np_ffn(x, p):  # eq. (5)
  h = np.maximum(0, x @ p["ffn_in"]["kernel"] + p["ffn_in"]["bias"])
  return h @ p["ffn_out"]["kernel"] + p["ffn_out"]["bias"]


@pytest.mark.parametrize("norm", ["pre_ln", "post_ln"])
def test_transformer_block_matches_eqs_3_to_5(norm):
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 4, 8)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
  block = layers.TransformerBlock(num_heads=2, ffn_dim=16, dropout_rate=0.1, kernel_init=INIT,
                                  norm=norm)
  params = block.init(jax.random.PRNGKey(2), x, mask, deterministic=True)
  out = np.asarray(block.apply(params, x, mask, deterministic=True))
  p = jax.tree.map(np.asarray, params["params"])
  attention = lambda y: np_attention(y, mask, p["attention"])  # noqa: E731
  if norm == "pre_ln":
    h = x + attention(np_layer_norm(x, p["ln_attention"]))
    h = h + np_ffn(np_layer_norm(h, p["ln_ffn"]), p)
    ref = np_layer_norm(h, p["ln_final"])
  else:
    h = np_layer_norm(x + attention(x), p["ln_attention"])
    ref = np_layer_norm(h + np_ffn(h, p), p["ln_ffn"])
  np.testing.assert_allclose(out[mask], ref[mask], rtol=2e-4, atol=2e-5)


def test_transformer_valid_outputs_ignore_padding_content():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(1, 5, 8)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0]], bool)
  block = layers.TransformerBlock(2, 16, 0.0, INIT)
  params = block.init(jax.random.PRNGKey(3), x, mask, deterministic=True)
  y = x.copy()
  y[:, 3:] = rng.normal(size=(1, 2, 8)) * 100
  a = block.apply(params, x, mask, deterministic=True)
  b = block.apply(params, y, mask, deterministic=True)
  np.testing.assert_allclose(a[:, :3], b[:, :3], rtol=1e-5, atol=1e-6)


def test_group_embedding_numeric_modes():
  from mian_jax.data.schema import Field
  fields = (Field("cat", "categorical", 5), Field("price", "numeric"))
  inputs = {"cat": jnp.array([2, 3]), "price": jnp.array([1.5, -2.0])}
  for mode in ("linear", "pad"):
    module = layers.GroupEmbedding(fields, 3, 0.02, mode)
    params = module.init(jax.random.PRNGKey(0), inputs)
    out = np.asarray(module.apply(params, inputs))
    assert out.shape == (2, 2, 3)
    table = np.asarray(params["params"]["embed_cat"]["embedding"])
    np.testing.assert_allclose(out[:, 0], table[[2, 3]])
    if mode == "linear":
      v = np.asarray(params["params"]["numeric_price"])
      np.testing.assert_allclose(out[:, 1], np.array([[1.5], [-2.0]]) * v, rtol=1e-6)
    else:
      np.testing.assert_allclose(out[:, 1], [[1.5, 0, 0], [-2.0, 0, 0]])


# ----------------------------------------------------------------------------- dropout

def _drop(rate, rng_impl, x, seed, deterministic=False):
  return np.asarray(layers.Dropout(rate, rng_impl).apply(
      {}, x, deterministic=deterministic, rngs={"dropout": jax.random.PRNGKey(seed)}))


def test_threefry_dropout_is_flax_dropout_bit_for_bit():
  x = np.random.default_rng(0).normal(size=(64, 33)).astype(np.float32)
  ours = _drop(0.3, "threefry", x, 5)
  flax = nn.Dropout(0.3).apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(5)})
  np.testing.assert_array_equal(ours, np.asarray(flax))
  assert layers.attention_with_dropout("threefry") is nn.dot_product_attention


@pytest.mark.parametrize("rng_impl", typing.get_args(layers.DropoutRng))
def test_dropout_keeps_one_minus_rate_scaled_and_is_keyed_by_the_rng(rng_impl):
  x = np.ones((1000, 1000), np.float32)
  a, b = _drop(0.2, rng_impl, x, 0), _drop(0.2, rng_impl, x, 1)
  kept = a != 0
  assert set(np.unique(a)) == {0.0, np.float32(1 / 0.8)}
  # 1e6 Bernoulli(0.8) draws: standard error 4e-4.
  assert abs(kept.mean() - 0.8) < 0.002
  assert abs(a.mean() - 1.0) < 0.0025  # unbiased: E[dropout(x)] = x
  np.testing.assert_array_equal(a, _drop(0.2, rng_impl, x, 0))  # same key, same mask
  assert not np.array_equal(a, b)
  corr = lambda u, v: np.corrcoef(u.ravel(), v.ravel())[0, 1]  # noqa: E731
  # No correlation (standard error 1e-3): between keys, and between neighbouring elements
  # along rows, along columns and in flat order.
  assert abs(corr(kept, b != 0)) < 0.005
  assert abs(corr(kept[:, 1:], kept[:, :-1])) < 0.005
  assert abs(corr(kept[1:], kept[:-1])) < 0.005
  assert abs(corr(kept.ravel()[1:], kept.ravel()[:-1])) < 0.005
  np.testing.assert_array_equal(_drop(0.2, rng_impl, x, 0, deterministic=True), x)
  np.testing.assert_array_equal(_drop(0.0, rng_impl, x, 0), x)
  np.testing.assert_array_equal(_drop(1.0, rng_impl, x[:3], 0), np.zeros_like(x[:3]))


def test_hash_bits_are_balanced_and_distinct_within_a_call():
  bits = np.asarray(layers.hash_bits(jax.random.PRNGKey(7), (1 << 20,)))
  assert len(np.unique(bits)) == bits.size  # a bijection of the counter
  per_bit = ((bits[:, None] >> np.arange(32, dtype=np.uint32)) & 1).mean(0)
  # 2^20 fair bits per position: standard error 5e-4.
  assert np.all(np.abs(per_bit - 0.5) < 0.003), per_bit


def test_hash_attention_dropout_masks_weights_shared_over_batch_and_heads():
  rng = np.random.default_rng(4)
  q, k, v = (rng.normal(size=(3, 5, 2, 4)).astype(np.float32) for _ in range(3))
  mask = np.ones((3, 1, 5, 5), bool)
  mask[0, :, :, 3:] = False
  attend = layers.attention_with_dropout("hash")
  np.testing.assert_allclose(attend(q, k, v, mask=mask, deterministic=True),
                             nn.dot_product_attention(q, k, v, mask=mask), rtol=1e-5, atol=1e-6)
  key = jax.random.PRNGKey(9)
  out = attend(q, k, v, mask=mask, dropout_rng=key, dropout_rate=0.5, deterministic=False)
  keep = np.asarray(layers.keep_mask(key, (5, 5), 0.5, "hash"))
  weights = np.asarray(nn.dot_product_attention_weights(q, k, mask=mask)) * keep / 0.5
  np.testing.assert_allclose(out, np.einsum("bhqk,bkhd->bqhd", weights, v), rtol=1e-5,
                             atol=1e-6)
  assert 0 < keep.sum() < keep.size


def test_reverse_valid_reverses_each_rows_valid_prefix_and_is_its_own_inverse():
  x = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
  lengths = jnp.array([3, 0])
  out = np.asarray(layers.reverse_valid(jnp.asarray(x), lengths))
  np.testing.assert_array_equal(out[0], x[0][[2, 1, 0, 3]])
  np.testing.assert_array_equal(out[1], x[1])
  np.testing.assert_array_equal(layers.reverse_valid(jnp.asarray(out), lengths), x)
  ids = jnp.array([[4, 5, 0], [6, 7, 8]])
  np.testing.assert_array_equal(layers.reverse_valid(ids, jnp.array([2, 3])),
                                [[5, 4, 0], [8, 7, 6]])
