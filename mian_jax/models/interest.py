"""DIN (Zhou et al. 2018) and DIEN (Zhou et al. 2019), read as docs/baselines.md says. B batch,
T behaviours, d_b = embed_dim * #behaviour fields (width of e_b^t and of q), H = gru_dim."""

from __future__ import annotations

import functools
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mian_jax.errors import ConfigError
from mian_jax.models import base, layers


class InterestModel(base.DeepModel):
  """DIN and DIEN: a user interest from the behaviours, then an MLP with PReLU or Dice."""
  use_dice: bool
  baseline_inputs: Literal["reference", "paper"]  # MLP inputs: authors' code's, papers' figures'

  def embed(self, batch) -> layers.FieldEmbeddings:
    if not self.features.behavior_fields:
      raise ConfigError(f"model.name={type(self).__name__.lower()!r} needs behaviour fields; "
                        "this data set has none")
    return super().embed(batch)

  def head(self, parts: list[jax.Array | None], *, train: bool) -> jax.Array:
    """MLP "mlp" and "logit" over the flattened parts [B, ...] (None: a missing group) -> [B]."""
    x = jnp.concatenate([p.reshape(p.shape[0], -1) for p in parts if p is not None], -1)
    h = self.mlp(x, train=train, activation="dice" if self.use_dice else "prelu")
    return nn.Dense(1, kernel_init=self.kernel_init(), name="logit")(h)[:, 0]


class DIN(InterestModel):
  """v_U = sum_t a_t e_b^t (eq. 3), a_t from `layers.LocalActivationUnit` (`din_attention_norm`),
  then the MLP (Fig. 2) over [e_u; v_U; e_i; e_c] ("paper") or [e_u; v_U; e_i; e_c; v_U * q]
  ("reference"). aux["attention"]["din"]: a_t [B, T], zero at padding."""
  attention_mlp_dims: tuple[int, ...]
  din_attention_norm: layers.DinAttentionNorm

  @nn.compact
  def __call__(self, batch, *, train: bool):
    e = self.embed(batch)
    keys = layers.flatten_fields(e.hist)                                   # [B, T, d_b]
    query = base.candidate_query(self.features, e.item)                    # [B, d_b]
    weights = layers.LocalActivationUnit(self.attention_mlp_dims, self.kernel_init(),
                                         self.use_dice, self.din_attention_norm,
                                         name="activation_unit")(query, keys, e.mask)
    interest = jnp.einsum("bt,btd->bd", weights, keys)                     # eq. 3
    parts = [e.user, interest, e.item, e.context]
    if self.baseline_inputs == "reference":
      parts.append(interest * query)
    logits = self.head(parts, train=train).astype(jnp.float32)
    return logits, {"attention": {"din": weights}, "embedding_sq_norm": e.sq_norm}


class DIEN(InterestModel):
  """Interest extractor GRU (eq. 1) with the auxiliary loss (eq. 3), a_t = softmax_t(h_t W e_a)
  over valid t (eq. 5), interest evolving AUGRU (eqs. 6-7); MLP over [e_u; e_i; h'_T; e_c]
  ("paper", Fig. 4), + [s; s * e_a] ("reference"), s = sum_t e_b^t. aux: "attention" {"dien":
  a_t [B, T]}, "aux_loss" aux_loss_weight * L_aux (eq. 4) if training with it, else 0."""
  gru_dim: int
  use_aux_loss: bool
  aux_loss_weight: float
  aux_mlp_dims: tuple[int, ...]

  @nn.compact
  def __call__(self, batch, *, train: bool):
    kernel_init = self.kernel_init()
    batch = base.oldest_first(batch)  # the GRUs read behaviours in time order
    e = self.embed(batch)
    behaviors = layers.flatten_fields(e.hist)                             # [B, T, d_b]
    # Unrolled at inference: same result, a much faster forward pass on a CPU.
    gru = functools.partial(layers.GRU, self.gru_dim, kernel_init, unroll=not train)
    states, _ = gru(name="interest_extractor")(behaviors, e.mask)         # eq. 1: [B, T, H]
    e_a = base.candidate_query(self.features, e.item)                                  # [B, d_b]
    w = self.param("attention_kernel", kernel_init, (self.gru_dim, e_a.shape[-1]))
    attention = layers.masked_softmax(jnp.einsum("bth,hd,bd->bt", states, w, e_a),
                                      e.mask)                              # eq. 5
    _, interest = gru(name="interest_evolving")(states, e.mask, attention)  # eqs. 6-7: [B, H]

    parts = [e.user, e.item, interest, e.context]
    if self.baseline_inputs == "reference":
      history_sum = layers.flatten_fields(layers.pool_sequence(e.hist, e.mask, "sum"))
      parts += [history_sum, history_sum * e_a]                            # [B, d_b] each
    logits = self.head(parts, train=train)

    aux_loss = jnp.zeros((), jnp.float32)
    if self.use_aux_loss and (train or self.is_initializing()):
      aux_loss = self._aux_loss(batch, states, behaviors, e.mask, kernel_init, train)
    attention = layers.reverse_valid(attention, batch["hist_len"])  # back to storage order
    aux = {"attention": {"dien": attention}, "embedding_sq_norm": e.sq_norm}
    return logits.astype(jnp.float32), {**aux, "aux_loss": self.aux_loss_weight * aux_loss}

  def _aux_loss(self, batch, states, behaviors, mask, kernel_init, train):
    """Eq. 3: h_t should score the next behaviour e_b^{t+1} above a sampled negative.
    states: [B, T, H]; behaviours: [B, T, d_b]; mask: [B, T]. Returns L_aux (scalar)."""
    net = _AuxiliaryNet(self.aux_mlp_dims, kernel_init, name="auxiliary_net")
    # At initialisation (not train) only the parameters are built: no random numbers needed.
    negatives, usable = (self._sample_negatives(batch, behaviors, mask) if train
                         else (behaviors, mask))
    h = states[:, :-1]                                                     # h_t, t < T - 1
    weight = batch.get("weight", jnp.ones(mask.shape[:1], jnp.float32))[:, None]
    pair = mask[:, 1:] * weight                                            # e_b^{t+1} is valid
    pos_loss = optax.sigmoid_binary_cross_entropy(net(h, behaviors[:, 1:]), 1.0)
    neg_loss = optax.sigmoid_binary_cross_entropy(net(h, negatives[:, 1:]), 0.0)
    total = jnp.sum(pair * pos_loss) + jnp.sum(pair * usable[:, 1:] * neg_loss)
    return total / jnp.maximum(jnp.sum(pair), 1.0)

  def _sample_negatives(self, batch, behaviors, mask):
    """For each (b, t), a random valid position of a random row b' != b ("dropout" stream).
    Returns (negatives [B, T, d_b], usable [B, T]: b' != b has behaviours, differs from e_b^t)."""
    b, t = mask.shape
    row_key, pos_key = jax.random.split(self.make_rng("dropout"))
    offset = jax.random.randint(row_key, (b, t), 1, max(b, 2))
    rows = (jnp.arange(b)[:, None] + offset) % b                            # [B, T]
    lengths = jnp.asarray(batch["hist_len"])[rows]
    pos = jnp.minimum((jax.random.uniform(pos_key, (b, t)) * lengths).astype(jnp.int32), t - 1)
    ids = [jnp.asarray(batch["hist"][name]) for name in self.features.behavior_fields]
    same = jnp.all(jnp.stack([x[rows, pos] == x for x in ids]), axis=0)  # [B, T]
    usable = (lengths > 0) & (rows != jnp.arange(b)[:, None]) & ~same
    return behaviors[rows, pos], usable


class _AuxiliaryNet(nn.Module):
  """Eq. 3's sigma(h_t, e), an MLP over [h_t; e] (authors' code): [B, T', H + d_b] -> [B, T']."""
  dims: tuple[int, ...]
  kernel_init: nn.initializers.Initializer

  @nn.compact
  def __call__(self, h, e):
    x = layers.MLP(self.dims, 0.0, self.kernel_init, name="mlp")(
        jnp.concatenate([h, e], -1), deterministic=True)
    return nn.Dense(1, kernel_init=self.kernel_init, name="logit")(x)[..., 0]
