"""Deep Interest Evolution Network (Zhou et al. 2019), read as docs/baselines.md says.
Shapes: B batch, T behaviours, d_b = embed_dim * #behaviour fields, H = gru_dim."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mian_jax.models import base, layers


class DIEN(base.InterestModel):
  """Interest extractor GRU (eq. 1) with the auxiliary loss (eq. 3), attention
  a_t = softmax_t(h_t W e_a) over valid t (eq. 5), interest evolving AUGRU (eqs. 6-7) whose last
  valid state h'_T joins the MLP's input: [e_u; e_i; h'_T; e_c] ("paper", Fig. 4), or
  [e_u; e_i; h'_T; e_c; s; s * e_a] ("reference"), s = sum_t e_b^t over valid t.
  aux["attention"]["dien"]: a_t [B, T]; aux["aux_loss"]: aux_loss_weight * L_aux (eq. 4) in
  training with use_aux_loss, else 0 (the train step adds it to the loss)."""
  gru_dim: int
  use_aux_loss: bool
  aux_loss_weight: float
  aux_mlp_dims: tuple[int, ...]

  @nn.compact
  def __call__(self, batch, *, train: bool):
    f = self.features
    base.require_behaviours(f, "dien")
    kernel_init = self.kernel_init()
    batch = base.oldest_first(batch)  # the GRUs read behaviours in time order
    e = self.embed(batch)
    behaviours = layers.flatten_fields(e.hist)                             # [B, T, d_b]
    # Unrolled at inference: same result, a much faster forward pass on a CPU.
    states, _ = layers.GRU(self.gru_dim, kernel_init, unroll=not train,
                           name="interest_extractor")(behaviours, e.mask)  # eq. 1: [B, T, H]
    e_a = base.candidate_query(f, e.item)                                  # [B, d_b]
    w = self.param("attention_kernel", kernel_init, (self.gru_dim, e_a.shape[-1]))
    attention = layers.masked_softmax(jnp.einsum("bth,hd,bd->bt", states, w, e_a),
                                      e.mask)                              # eq. 5
    _, interest = layers.GRU(self.gru_dim, kernel_init, unroll=not train,
                             name="interest_evolving")(
        states, e.mask, attention)                                         # eqs. 6-7: [B, H]

    parts = [base.flat(e.user), base.flat(e.item), interest, base.flat(e.context)]
    if self.baseline_inputs == "reference":
      history_sum = layers.flatten_fields(layers.pool_sequence(e.hist, e.mask, "sum"))
      parts += [history_sum, history_sum * e_a]                            # [B, d_b] each
    logits = self.head(parts, train=train)

    aux_loss = jnp.zeros((), jnp.float32)
    if self.use_aux_loss and (train or self.is_initializing()):
      aux_loss = self._aux_loss(batch, states, behaviours, e.mask, kernel_init, train)
    attention = layers.reverse_valid(attention, batch["hist_len"])  # back to storage order
    return logits.astype(jnp.float32), {"attention": {"dien": attention},
                                        "embedding_sq_norm": e.sq_norm,
                                        "aux_loss": self.aux_loss_weight * aux_loss}

  def _aux_loss(self, batch, states, behaviours, mask, kernel_init, train):
    """Eq. 3: h_t should score the next behaviour e_b^{t+1} above a sampled negative.
    states: [B, T, H]; behaviours: [B, T, d_b]; mask: [B, T]. Returns L_aux (scalar)."""
    net = _AuxiliaryNet(self.aux_mlp_dims, kernel_init, name="auxiliary_net")
    if train:
      negatives, usable = self._sample_negatives(batch, behaviours, mask)
    else:  # initialisation only: build the parameters, no random numbers needed
      negatives, usable = behaviours, mask
    h = states[:, :-1]                                                     # h_t, t < T - 1
    weight = batch.get("weight", jnp.ones(mask.shape[:1], jnp.float32))[:, None]
    pair = mask[:, 1:] * weight                                            # e_b^{t+1} is valid
    pos = net(h, behaviours[:, 1:])
    neg = net(h, negatives[:, 1:])
    pos_loss = optax.sigmoid_binary_cross_entropy(pos, jnp.ones_like(pos))
    neg_loss = optax.sigmoid_binary_cross_entropy(neg, jnp.zeros_like(neg))
    total = jnp.sum(pair * pos_loss) + jnp.sum(pair * usable[:, 1:] * neg_loss)
    return total / jnp.maximum(jnp.sum(pair), 1.0)

  def _sample_negatives(self, batch, behaviours, mask):
    """For each (b, t): a random other row b' != b, then a random valid position of b', from
    the "dropout" stream. Returns (negatives [B, T, d_b], usable [B, T] bool: b' has
    behaviours, b' != b, and the sampled behaviour differs from e_b^t in some field)."""
    b, t = mask.shape
    row_key, pos_key = jax.random.split(self.make_rng("dropout"))
    offset = jax.random.randint(row_key, (b, t), 1, max(b, 2))
    rows = (jnp.arange(b)[:, None] + offset) % b                            # [B, T]
    lengths = jnp.asarray(batch["hist_len"])[rows]
    pos = jnp.minimum((jax.random.uniform(pos_key, (b, t)) * lengths).astype(jnp.int32), t - 1)
    same = jnp.ones((b, t), bool)
    for name in self.features.behavior_fields:
      ids = jnp.asarray(batch["hist"][name])
      same &= ids[rows, pos] == ids
    usable = (lengths > 0) & (rows != jnp.arange(b)[:, None]) & ~same
    return behaviours[rows, pos], usable


class _AuxiliaryNet(nn.Module):
  """Eq. 3's sigma(h_t, e), an MLP over [h_t; e] as in the authors' code, returning a logit.
  h: [B, T', H]; e: [B, T', d_b] -> [B, T']."""
  dims: tuple[int, ...]
  kernel_init: nn.initializers.Initializer

  @nn.compact
  def __call__(self, h, e):
    x = layers.MLP(self.dims, 0.0, self.kernel_init, name="mlp")(
        jnp.concatenate([h, e], -1), deterministic=True)
    return nn.Dense(1, kernel_init=self.kernel_init, name="logit")(x)[..., 0]
