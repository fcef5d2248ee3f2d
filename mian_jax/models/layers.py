"""Shared CTR layers: MIAN's (docs/model.md), then the baselines' (docs/baselines.md)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mian_jax.data.schema import FeatureSpec, Field

Array = jax.Array

# The string choices of these layers, declared once (models.CHOICES collects them).
DenseInit = Literal["lecun_normal", "truncated_normal"]
DropoutRng = Literal["hash", "threefry"]  # dropout's random bits (docs/performance.md)
NumericEmbedding = Literal["linear", "pad"]
ScoreActivation = Literal["tanh", "none"]
GimCombine = Literal["project_sum", "weighted_concat"]
TransformerNorm = Literal["pre_ln", "post_ln"]
SequencePooling = Literal["mean", "sum"]
DinAttentionNorm = Literal["none", "softmax", "scaled_softmax"]  # LocalActivationUnit


def flatten_fields(x: Array | None) -> Array | None:
  """[..., F, D] -> [..., F * D]: the concatenation [x^1; ...; x^F] of eq. (1); None stays."""
  return None if x is None else x.reshape(*x.shape[:-2], -1)


def reverse_valid(x: Array, lengths: Array) -> Array:
  """x [B, T, ...] with each row's first lengths[b] entries reversed (newest <-> oldest first)."""
  t = jnp.arange(x.shape[1])[None, :]
  index = jnp.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def masked_softmax(scores: Array, mask: Array | None) -> Array:
  """Softmax of scores [..., N] over the last axis within mask [..., N] (or None); 0 if empty."""
  if mask is None:
    return jax.nn.softmax(scores, axis=-1)
  scores = jnp.where(mask, scores, -jnp.inf)
  peak = jnp.max(scores, axis=-1, keepdims=True)
  weights = jnp.where(mask, jnp.exp(scores - jnp.where(jnp.isfinite(peak), peak, 0.0)), 0.0)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  return weights / jnp.where(total > 0, total, 1.0)


def mix32(x: Array) -> Array:
  """lowbias32 (C. Wellons, "Prospecting for hash functions", 2018), a bijection of uint32."""
  for shift, multiplier in ((16, 0x7FEB352D), (15, 0x846CA68B)):
    x = (x ^ (x >> shift)) * jnp.uint32(multiplier)
  return x ^ (x >> 16)


def hash_bits(rng: Array, shape: tuple[int, ...]) -> Array:
  """uint32 bits [*shape]: mix32(mix32(i ^ s0) ^ s1) of element i, (s0, s1) drawn from `rng`."""
  size = int(np.prod(shape))
  if size >= 2**32:
    raise ValueError(f"hash dropout counts elements in uint32; {shape} has {size}")
  seed = jax.random.bits(rng, (2,), jnp.uint32)
  return mix32(mix32(jax.lax.iota(jnp.uint32, size).reshape(shape) ^ seed[0]) ^ seed[1])


def keep_mask(rng: Array, shape: tuple[int, ...], rate: float, rng_impl: DropoutRng) -> Array:
  """bool [*shape], True with probability 1 - rate; "hash" bits fuse into the masking op."""
  if rng_impl == "threefry":
    return jax.random.bernoulli(rng, 1.0 - rate, shape)
  threshold = min(int(round(rate * 2.0**32)), 2**32 - 1)
  return hash_bits(rng, shape) >= jnp.uint32(threshold)


class Dropout(nn.Module):
  """Inverted dropout; with "threefry" bit-identical to nn.Dropout (same stream and path)."""
  rate: float
  rng_impl: DropoutRng = "hash"

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    if deterministic or self.rate == 0.0:
      return x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    keep = keep_mask(self.make_rng("dropout"), x.shape, self.rate, self.rng_impl)
    return jax.lax.select(keep, x / (1.0 - self.rate), jnp.zeros_like(x))


def attention_with_dropout(rng_impl: DropoutRng):
  """nn.dot_product_attention, its weights' dropout mask [Tq, Tk] (broadcast) from `rng_impl`."""
  if rng_impl == "threefry":
    return nn.dot_product_attention

  def attend(query, key, value, mask=None, dropout_rng=None, dropout_rate=0.0,
             deterministic=False, dtype=None, precision=None):
    """query: [B, Tq, H, d]; key, value: [B, Tk, H, d]; mask: [B, 1, Tq, Tk]."""
    weights = nn.dot_product_attention_weights(query, key, mask=mask, dtype=dtype,
                                               precision=precision)  # [B, H, Tq, Tk]
    if not deterministic and dropout_rate > 0.0:
      keep = keep_mask(dropout_rng, weights.shape[-2:], dropout_rate, rng_impl)
      weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("...hqk,...khd->...qhd", weights, value, precision=precision)
  return attend


SPARSE_ROWS = "sparse_rows"  # collection of row tables, see optim.value_and_grad


class GroupEmbedding(nn.Module):
  """Eq. (2): a categorical field from its table V_i, a numeric x as x * v_i ("linear") or
  [x, 0, ..., 0] ("pad"). Calls of one instance share tables."""
  fields: tuple[Field, ...]
  embed_dim: int
  init_std: float
  numeric_embedding: NumericEmbedding = "linear"

  def setup(self):
    init = nn.initializers.truncated_normal(self.init_std)
    self.tables = {f.name: nn.Embed(f.vocab_size, self.embed_dim, embedding_init=init,
                                    name=f"embed_{f.name}")
                   for f in self.fields if f.is_categorical}
    if self.numeric_embedding == "linear":
      self.numeric = {f.name: self.param(f"numeric_{f.name}", init, (self.embed_dim,))
                      for f in self.fields if not f.is_categorical}

  def __call__(self, inputs: Mapping[str, Array],
               names: Sequence[str] | None = None) -> Array:
    """Embeds fields `names` (default: all) of `inputs`, each [...]; returns [..., F, D]."""
    fields = {f.name: f for f in self.fields}
    return jnp.stack([self._embed(fields[n], inputs[n]) for n in names or fields], axis=-2)

  def _embed(self, field: Field, x: Array) -> Array:
    if field.is_categorical and self.has_variable(SPARSE_ROWS, f"embed_{field.name}"):
      # Row-sparse training (optim.value_and_grad): ids are positions in the batch's rows.
      return jnp.take(self.get_variable(SPARSE_ROWS, f"embed_{field.name}"), x, axis=0)
    if field.is_categorical:
      return self.tables[field.name](x)
    x = x.astype(jnp.float32)[..., None]
    if self.numeric_embedding == "linear":
      return x * self.numeric[field.name]
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, self.embed_dim - 1)])


class MLP(nn.Module):
  """Eq. (16): R_l = dropout(act(W_l R_{l-1} + b_l)); act ReLU, PReLU (slope 0.25) or Dice."""
  dims: tuple[int, ...]
  dropout_rate: float
  kernel_init: nn.initializers.Initializer
  dropout_rng: DropoutRng = "hash"
  activation: Literal["relu", "prelu", "dice"] = "relu"

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    for i, dim in enumerate(self.dims):
      x = nn.Dense(dim, kernel_init=self.kernel_init, name=f"Dense_{i}")(x)
      if self.activation == "relu":
        x = nn.relu(x)
      else:
        x = (Dice(name=f"activation_{i}") if self.activation == "dice"
             else nn.PReLU(negative_slope_init=0.25, name=f"activation_{i}"))(x)
      x = Dropout(self.dropout_rate, self.dropout_rng)(x, deterministic=deterministic)
    return x


class AttentionPool(nn.Module):
  """Eqs. (7)-(9), (10)-(11), (12)-(13): alpha_n = softmax_n(act(V_n . W_n + b_n)) over valid n,
  R = sum_n alpha_n V_n; act tanh or "none"; (W_n, b_n) per slot or one shared (W, b)."""
  per_slot: bool
  kernel_init: nn.initializers.Initializer
  score_activation: ScoreActivation = "tanh"

  @nn.compact
  def __call__(self, values: Array, mask: Array | None = None,
               extra_scores: Array | None = None) -> tuple[Array, Array]:
    """values: [B, N, d]; mask: [B, N] bool or None; extra_scores: [B, N] added inside act.
    Returns (pooled [B, d], alpha [B, N])."""
    n, d = values.shape[-2:]
    if self.per_slot:  # n independent [d, 1] kernels, each initialised as a Dense kernel
      slot_init = lambda key, shape: jax.vmap(  # noqa: E731
          lambda k: self.kernel_init(k, (shape[1], 1))[:, 0])(jax.random.split(key, shape[0]))
      w = self.param("score_kernel", slot_init, (n, d))
      b = self.param("score_bias", nn.initializers.zeros, (n,))
      scores = jnp.einsum("bnd,nd->bn", values, w) + b
    else:
      w = self.param("score_kernel", self.kernel_init, (d, 1))
      b = self.param("score_bias", nn.initializers.zeros, ())
      scores = (values @ w)[..., 0] + b
    if extra_scores is not None:
      scores = scores + extra_scores
    alpha = masked_softmax(jnp.tanh(scores) if self.score_activation == "tanh" else scores, mask)
    return jnp.einsum("bn,bnd->bd", alpha, values), alpha


class GlobalAttention(nn.Module):
  """Eqs. (14)-(15): alpha_l = softmax_l(act(r_l . W_l + b_l)) over parts r_l [B, d_l]; R_g =
  sum_l alpha_l P_l r_l ("project_sum", P_l: [d_l, dim]) or [alpha_l r_l]_l ("weighted_concat")."""
  combine: GimCombine
  dim: int
  kernel_init: nn.initializers.Initializer
  score_activation: ScoreActivation = "tanh"

  @nn.compact
  def __call__(self, parts: Sequence[Array]) -> tuple[Array, Array]:
    """parts: L arrays [B, d_l]. Returns (R_g, alpha [B, L])."""
    scores = jnp.stack([nn.Dense(1, kernel_init=self.kernel_init, name=f"score_{l}")(r)[:, 0]
                        for l, r in enumerate(parts)], axis=-1)
    alpha = jax.nn.softmax(jnp.tanh(scores) if self.score_activation == "tanh" else scores, -1)
    if self.combine == "project_sum":
      projected = jnp.stack([nn.Dense(self.dim, use_bias=False, kernel_init=self.kernel_init,
                                      name=f"project_{l}")(r) for l, r in enumerate(parts)], 1)
      return jnp.einsum("bl,bld->bd", alpha, projected), alpha
    return jnp.concatenate([alpha[:, l:l + 1] * r for l, r in enumerate(parts)], -1), alpha


class TransformerBlock(nn.Module):
  """Eqs. (3)-(5), one block, padding masked as keys. "pre_ln" (Xiong et al. 2020):
  x += MHA(LN(x)); x += FFN(LN(x)); x = LN(x). "post_ln": x = LN(x + MHA(x)); x = LN(x + FFN(x))."""
  num_heads: int
  ffn_dim: int
  dropout_rate: float
  kernel_init: nn.initializers.Initializer
  norm: TransformerNorm = "pre_ln"
  dropout_rng: DropoutRng = "hash"

  @nn.compact
  def __call__(self, x: Array, mask: Array, *, deterministic: bool) -> Array:
    """x: [B, T, d]; mask: [B, T] bool. Returns [B, T, d]."""
    dropout = lambda y: Dropout(self.dropout_rate, self.dropout_rng)(  # noqa: E731
        y, deterministic=deterministic)
    attention = nn.MultiHeadDotProductAttention(  # eq. (4)
        num_heads=self.num_heads, kernel_init=self.kernel_init, dropout_rate=self.dropout_rate,
        deterministic=deterministic, attention_fn=attention_with_dropout(self.dropout_rng),
        name="attention")
    attend = lambda y: attention(y, y, mask=nn.make_attention_mask(mask, mask))  # noqa: E731

    def feed_forward(y):  # eq. (5)
      y = nn.relu(nn.Dense(self.ffn_dim, kernel_init=self.kernel_init, name="ffn_in")(y))
      return nn.Dense(x.shape[-1], kernel_init=self.kernel_init, name="ffn_out")(y)

    if self.norm == "pre_ln":  # eq. (3) before each sub-layer
      x = x + dropout(attend(nn.LayerNorm(name="ln_attention")(x)))
      x = x + dropout(feed_forward(nn.LayerNorm(name="ln_ffn")(x)))
      return nn.LayerNorm(name="ln_final")(x)
    x = nn.LayerNorm(name="ln_attention")(x + dropout(attend(x)))
    return nn.LayerNorm(name="ln_ffn")(x + dropout(feed_forward(x)))


class FieldEmbeddings(NamedTuple):
  """Every field of a batch embedded by `InputEmbedding`."""
  item: Array  # [B, Fi, D], the candidate item's fields
  hist: Array | None  # [B, T, Fb, D], behaviour fields, zero at padded positions
  user: Array | None  # [B, J, D]
  context: Array | None  # [B, K, D]
  mask: Array  # [B, T] bool, True at valid behaviours
  sq_norm: Array  # [B], squared norm of the embeddings each example looked up (no padding)


class InputEmbedding(nn.Module):
  """Eq. (2) for every field group; the candidate and the behaviours share the item tables."""
  features: FeatureSpec
  embed_dim: int
  init_std: float
  numeric_embedding: NumericEmbedding = "linear"

  @nn.compact
  def __call__(self, batch) -> FieldEmbeddings:
    f = self.features
    group = lambda fields, name: GroupEmbedding(  # noqa: E731
        fields, self.embed_dim, self.init_std, self.numeric_embedding, name=name)
    item_embedding = group(f.item_fields, "item_embedding")
    item = item_embedding(batch["item"])
    mask = jnp.arange(f.max_seq_len)[None, :] < batch["hist_len"][:, None]
    hist = (item_embedding(batch["hist"], f.behavior_fields) * mask[..., None, None]
            if f.behavior_fields else None)
    user, context = (group(fields, f"{g}_embedding")(batch[g]) if fields else None
                     for g, fields in (("user", f.user_fields), ("context", f.context_fields)))
    sq_norm = sum(jnp.sum(e.reshape(e.shape[0], -1)**2, axis=-1)
                  for e in (item, hist, user, context) if e is not None)
    return FieldEmbeddings(item, hist, user, context, mask, sq_norm)


# ----------------------------------------------------------------------------- baselines
# B batch, T behaviours, F fields, D embed_dim, d any feature width, H hidden width.

DICE_EPS = 1e-8  # epsilon inside Dice's normalisation (Zhou et al. 2018, eq. 14)


def pool_sequence(hist: Array, mask: Array, mode: SequencePooling) -> Array:
  """[B, T, F, D] (zero at padding) -> [B, F, D]: sum or mean over valid positions, or 0."""
  # A contraction, not a masked jnp.sum: 3x faster on XLA's CPU backend (docs/performance.md).
  total = jnp.einsum("btfd,bt->bfd", hist, mask.astype(hist.dtype))
  if mode == "sum":
    return total
  count = jnp.maximum(jnp.sum(mask, axis=1), 1).astype(hist.dtype)
  return total / count[:, None, None]


def stack_fields(e: FieldEmbeddings, pooling: SequencePooling) -> Array:
  """[B, F, D]: candidate fields, behaviour fields pooled (`pool_sequence`), user, context."""
  hist = None if e.hist is None else pool_sequence(e.hist, e.mask, pooling)
  return jnp.concatenate([x for x in (e.item, hist, e.user, e.context) if x is not None], -2)


class LinearTerm(nn.Module):
  """The first-order / "wide" part b + sum_f w_f(x_f) over `stack_fields` of width 1.
  Returns (logit part [B], sq_norm [B] of the weights looked up)."""
  features: FeatureSpec
  init_std: float
  sequence_pooling: SequencePooling = "mean"

  @nn.compact
  def __call__(self, batch) -> tuple[Array, Array]:
    e = InputEmbedding(self.features, 1, self.init_std, "linear", name="weights")(batch)
    bias = self.param("bias", nn.initializers.zeros, ())
    return jnp.sum(stack_fields(e, self.sequence_pooling), axis=(-2, -1)) + bias, e.sq_norm


def fm_second_order(v: Array) -> Array:
  """FM's sum_{i<j} <V_i, V_j> (DeepFM eq. 2) as 0.5 sum_d [(sum_f v_fd)^2 - sum_f v_fd^2].
  v: [B, F, D] -> [B]."""
  return 0.5 * jnp.sum(jnp.sum(v, axis=-2)**2 - jnp.sum(v**2, axis=-2), axis=-1)


class CrossNetwork(nn.Module):
  """DCN's cross network (eq. 3): x_{l+1} = x_0 x_l^T w_l + b_l + x_l; x_l, w_l, b_l: [d]."""
  num_layers: int
  kernel_init: nn.initializers.Initializer

  @nn.compact
  def __call__(self, x0: Array) -> Array:
    """x0: [B, d] -> x_L [B, d]."""
    x = x0
    for l in range(self.num_layers):
      w = self.param(f"kernel_{l}", self.kernel_init, (x0.shape[-1], 1))
      x = x0 * (x @ w) + self.param(f"bias_{l}", nn.initializers.zeros, x0.shape[-1:]) + x
    return x


class CIN(nn.Module):
  """xDeepFM's CIN (eqs. 6, 9; no activation, no "split half"): p+ = [p^1; ...; p^K],
  X^k_{h,*} = sum_{i,j} W^{k,h}_{ij} (X^{k-1}_{i,*} o X^0_{j,*}), p^k_h = sum_d X^k_{h,d}."""
  layer_sizes: tuple[int, ...]
  kernel_init: nn.initializers.Initializer

  @nn.compact
  def __call__(self, x0: Array) -> Array:
    """x0: [B, m, D] field embeddings -> p+ [B, sum(layer_sizes)]."""
    b, m, d = x0.shape
    x, pooled = x0, []
    for k, size in enumerate(self.layer_sizes):
      z = jnp.einsum("bhd,bmd->bhmd", x, x0).reshape(b, x.shape[1] * m, d)
      w = self.param(f"kernel_{k}", self.kernel_init, (z.shape[1], size))
      x = jnp.einsum("bnd,nh->bhd", z, w)
      pooled.append(jnp.sum(x, axis=-1))
    return jnp.concatenate(pooled, axis=-1)


class Dice(nn.Module):
  """DIN's Dice (eq. 14): f(s) = p s + (1 - p) alpha s, p = sigmoid((s - E[s]) / sqrt(Var[s] +
  eps)), E, Var over each row's units."""

  @nn.compact
  def __call__(self, s: Array) -> Array:
    """s: [..., H] -> [..., H]."""
    alpha = self.param("alpha", nn.initializers.zeros, (s.shape[-1],))
    mean, var = jnp.mean(s, axis=-1, keepdims=True), jnp.var(s, axis=-1, keepdims=True)
    p = jax.nn.sigmoid((s - mean) / jnp.sqrt(var + DICE_EPS))
    return p * s + (1.0 - p) * alpha * s


class LocalActivationUnit(nn.Module):
  """DIN's local activation unit (eq. 3, Fig. 2): s_t = MLP([q; k_t; q - k_t; q * k_t]); a_t =
  s_t ("none"), softmax_t(s_t) or softmax_t(s_t / sqrt(d)) ("scaled_softmax"), 0 at padding."""
  hidden_dims: tuple[int, ...]
  kernel_init: nn.initializers.Initializer
  use_dice: bool = False
  normalization: DinAttentionNorm = "none"

  @nn.compact
  def __call__(self, query: Array, keys: Array, mask: Array) -> Array:
    """query: [B, d]; keys: [B, T, d]; mask: [B, T] bool. Returns weights [B, T]."""
    q = jnp.broadcast_to(query[:, None, :], keys.shape)
    x = jnp.concatenate([q, keys, q - keys, q * keys], axis=-1)
    x = MLP(self.hidden_dims, 0.0, self.kernel_init,
            activation="dice" if self.use_dice else "prelu", name="mlp")(x, deterministic=True)
    score = nn.Dense(1, kernel_init=self.kernel_init, name="score")(x)[..., 0]
    if self.normalization == "none":
      return jnp.where(mask, score, 0.0)
    scale = np.sqrt(keys.shape[-1]) if self.normalization == "scaled_softmax" else 1.0
    return masked_softmax(score / scale, mask)


class GRU(nn.Module):
  """DIEN's GRU (eq. 1) over a padded sequence or, given attention a, its AUGRU (eqs. 6-7):
    u = sigmoid(W^u i + U^u h + b^u),  r = sigmoid(W^r i + U^r h + b^r),
    h~ = tanh(W^h i + r o (U^h h) + b^h),  u' = a u (AUGRU only),  h' = (1 - u') o h + u' o h~.
  The state is frozen on padded steps (final state = after the last valid one); outputs are 0."""
  hidden_dim: int
  kernel_init: nn.initializers.Initializer
  unroll: bool = False  # write out every step: faster forward, slower backward on a CPU

  @nn.compact
  def __call__(self, inputs: Array, mask: Array,
               attention: Array | None = None) -> tuple[Array, Array]:
    """inputs: [B, T, d]; mask, attention: [B, T]. Returns (outputs [B, T, H], final [B, H])."""
    x_proj = nn.Dense(3 * self.hidden_dim, kernel_init=self.kernel_init, name="input")(inputs)
    kernel = self.param("recurrent_kernel", self.kernel_init, (self.hidden_dim, x_proj.shape[-1]))

    def step(h, xs):
      x_t, m_t, a_t = xs  # x_t = [W^u i + b^u; W^r i + b^r; W^h i + b^h]: [B, 3H]
      xu, xr, xh = jnp.split(x_t, 3, axis=-1)
      hu, hr, hh = jnp.split(h @ kernel, 3, axis=-1)  # kernel = [U^u, U^r, U^h]
      u = jax.nn.sigmoid(xu + hu)
      candidate = jnp.tanh(xh + jax.nn.sigmoid(xr + hr) * hh)
      if a_t is not None:
        u = a_t[:, None] * u
      h = jnp.where(m_t[:, None], (1.0 - u) * h + u * candidate, h)
      return h, h * m_t[:, None]

    xs = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), (x_proj, mask, attention))  # time major
    h0 = jnp.zeros((inputs.shape[0], self.hidden_dim), x_proj.dtype)
    final, outputs = jax.lax.scan(step, h0, xs, unroll=self.unroll)
    return jnp.swapaxes(outputs, 0, 1), final
