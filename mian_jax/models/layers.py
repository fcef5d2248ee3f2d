"""Shared CTR layers: field embeddings, MLP, attention pooling, the Transformer block.

Equation numbers refer to Zhang et al., "Multi-Interactive Attention Network for Fine-grained
Feature Learning in CTR Prediction", WSDM 2021. Design decisions: docs/model.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mian_jax.data.schema import Field

Array = jax.Array


def truncated_normal(stddev: float) -> nn.initializers.Initializer:
  return nn.initializers.truncated_normal(stddev=stddev)


def dense_initializer(kind: str, init_std: float) -> nn.initializers.Initializer:
  """Initialiser of dense kernels: "truncated_normal" (std `init_std`, §4.3 read literally) or
  "lecun_normal" (std 1/sqrt(fan_in), which keeps activations at unit scale; docs/model.md)."""
  if kind == "truncated_normal":
    return truncated_normal(init_std)
  if kind == "lecun_normal":
    return nn.initializers.lecun_normal()
  raise ValueError(f"unknown dense initialiser {kind!r}")


def masked_softmax(scores: Array, mask: Array | None) -> Array:
  """Softmax over the last axis restricted to `mask`; all-masked rows give all zeros.

  Args:
    scores: [..., N] float.
    mask: [..., N] bool, or None for no masking.
  """
  if mask is None:
    return jax.nn.softmax(scores, axis=-1)
  scores = jnp.where(mask, scores, -jnp.inf)
  peak = jnp.max(scores, axis=-1, keepdims=True)
  peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
  weights = jnp.where(mask, jnp.exp(scores - peak), 0.0)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  return weights / jnp.where(total > 0, total, 1.0)


class GroupEmbedding(nn.Module):
  """Eq. (2): one embedding per field of a group.

  A categorical field is looked up in its own table V_i; a numeric scalar x becomes
  `x * v_i` with a learned vector v_i ("linear") or `[x, 0, ..., 0]` ("pad"), so that every
  field has width `embed_dim` (see docs/model.md, "numeric fields").

  The same instance may be called on several inputs (candidate item and behaviour sequence),
  which then share tables.
  """
  fields: tuple[Field, ...]
  embed_dim: int
  init_std: float
  numeric_embedding: str = "linear"  # "linear" | "pad"

  def setup(self):
    init = truncated_normal(self.init_std)
    self.tables = {f.name: nn.Embed(f.vocab_size, self.embed_dim, embedding_init=init,
                                    name=f"embed_{f.name}")
                   for f in self.fields if f.is_categorical}
    if self.numeric_embedding == "linear":
      self.numeric = {f.name: self.param(f"numeric_{f.name}", init, (self.embed_dim,))
                      for f in self.fields if not f.is_categorical}

  def __call__(self, inputs: Mapping[str, Array],
               names: Sequence[str] | None = None) -> Array:
    """Embeds fields `names` (default: all) of `inputs`, each [...]; returns [..., F, D]."""
    by_name = {f.name: f for f in self.fields}
    out = []
    for name in names if names is not None else [f.name for f in self.fields]:
      x = inputs[name]
      if by_name[name].is_categorical:
        out.append(self.tables[name](x))
      elif self.numeric_embedding == "linear":
        out.append(x.astype(jnp.float32)[..., None] * self.numeric[name])
      else:
        pad = jnp.zeros(x.shape + (self.embed_dim - 1,), jnp.float32)
        out.append(jnp.concatenate([x.astype(jnp.float32)[..., None], pad], axis=-1))
    return jnp.stack(out, axis=-2)


class MLP(nn.Module):
  """Eq. (16): R_l = ReLU(W_l R_{l-1} + b_l), with dropout after each hidden layer."""
  dims: tuple[int, ...]
  dropout_rate: float
  kernel_init: nn.initializers.Initializer

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    for dim in self.dims:
      x = nn.relu(nn.Dense(dim, kernel_init=self.kernel_init)(x))
      x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    return x


class AttentionPool(nn.Module):
  """Eqs. (7)-(9), (10)-(11), (12)-(13): additive attention pooling of N vectors.

    alpha_n = softmax_n(act(V_n . W_n + b_n)) over valid n,   R = sum_n alpha_n V_n

  with act = tanh as in the paper ("none" leaves the score linear). `per_slot` gives every
  slot n its own (W_n, b_n), as the paper's subscripts suggest; otherwise one (W, b) is shared.
  """
  per_slot: bool
  kernel_init: nn.initializers.Initializer
  score_activation: str = "tanh"  # "tanh" | "none"

  @nn.compact
  def __call__(self, values: Array, mask: Array | None = None,
               extra_scores: Array | None = None) -> tuple[Array, Array]:
    """values: [B, N, d]; mask: [B, N] bool or None; extra_scores: [B, N] added inside the
    activation (e.g. a bilinear query-key term). Returns (pooled [B, d], alpha [B, N])."""
    n, d = values.shape[-2:]
    init = self.kernel_init
    if self.per_slot:  # n independent [d, 1] kernels, each initialised as a Dense kernel
      slot_init = lambda key, shape: jax.vmap(  # noqa: E731
          lambda k: init(k, (shape[1], 1))[:, 0])(jax.random.split(key, shape[0]))
      w = self.param("score_kernel", slot_init, (n, d))
      b = self.param("score_bias", nn.initializers.zeros, (n,))
      scores = jnp.einsum("bnd,nd->bn", values, w) + b
    else:
      w = self.param("score_kernel", init, (d, 1))
      b = self.param("score_bias", nn.initializers.zeros, ())
      scores = (values @ w)[..., 0] + b
    if extra_scores is not None:
      scores = scores + extra_scores
    if self.score_activation == "tanh":
      scores = jnp.tanh(scores)
    alpha = masked_softmax(scores, mask)
    return jnp.einsum("bn,bnd->bd", alpha, values), alpha


class GlobalAttention(nn.Module):
  """Eqs. (14)-(15): attention over the L parts r_l of r_g, which have different widths.

    alpha_l = softmax_l(act(r_l . W_l + b_l))
    "project_sum":      R_g = sum_l alpha_l P_l r_l   (P_l: [d_l, gim_dim], eq. 15 read literally
                                                       once the parts share a width)
    "weighted_concat":  R_g = [alpha_1 r_1; ...; alpha_L r_L]
  """
  combine: str  # "project_sum" | "weighted_concat"
  dim: int
  kernel_init: nn.initializers.Initializer
  score_activation: str = "tanh"

  @nn.compact
  def __call__(self, parts: Sequence[Array]) -> tuple[Array, Array]:
    """parts: L arrays [B, d_l]. Returns (R_g, alpha [B, L])."""
    init = self.kernel_init
    scores = jnp.stack([
        nn.Dense(1, kernel_init=init, name=f"score_{l}")(r)[:, 0] for l, r in enumerate(parts)
    ], axis=-1)
    if self.score_activation == "tanh":
      scores = jnp.tanh(scores)
    alpha = jax.nn.softmax(scores, axis=-1)
    if self.combine == "project_sum":
      projected = jnp.stack([
          nn.Dense(self.dim, use_bias=False, kernel_init=init, name=f"project_{l}")(r)
          for l, r in enumerate(parts)
      ], axis=1)
      return jnp.einsum("bl,bld->bd", alpha, projected), alpha
    return jnp.concatenate([alpha[:, l:l + 1] * r for l, r in enumerate(parts)], -1), alpha


class TransformerBlock(nn.Module):
  """Eqs. (3)-(5): one Transformer block over a padded sequence.

    "pre_ln"  (Xiong et al. 2020): x += MHA(LN(x)); x += FFN(LN(x)); x = LN(x)
    "post_ln" (Vaswani et al. 2017): x = LN(x + MHA(x)); x = LN(x + FFN(x))

  Padded positions are masked as keys, so they never change a valid position's output.
  """
  num_heads: int
  ffn_dim: int
  dropout_rate: float
  kernel_init: nn.initializers.Initializer
  norm: str = "pre_ln"  # "pre_ln" | "post_ln"

  @nn.compact
  def __call__(self, x: Array, mask: Array, *, deterministic: bool) -> Array:
    """x: [B, T, d]; mask: [B, T] bool. Returns [B, T, d]."""
    init = self.kernel_init
    d = x.shape[-1]
    attention_mask = nn.make_attention_mask(mask, mask)
    dropout = lambda y: nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)  # noqa

    def attend(y):  # eq. (4)
      return nn.MultiHeadDotProductAttention(
          num_heads=self.num_heads, kernel_init=init, dropout_rate=self.dropout_rate,
          deterministic=deterministic, name="attention")(y, y, mask=attention_mask)

    def feed_forward(y):  # eq. (5)
      y = nn.relu(nn.Dense(self.ffn_dim, kernel_init=init, name="ffn_in")(y))
      return nn.Dense(d, kernel_init=init, name="ffn_out")(y)

    if self.norm == "pre_ln":  # eq. (3) before each sub-layer
      x = x + dropout(attend(nn.LayerNorm(name="ln_attention")(x)))
      x = x + dropout(feed_forward(nn.LayerNorm(name="ln_ffn")(x)))
      return nn.LayerNorm(name="ln_final")(x)
    x = nn.LayerNorm(name="ln_attention")(x + dropout(attend(x)))
    return nn.LayerNorm(name="ln_ffn")(x + dropout(feed_forward(x)))
