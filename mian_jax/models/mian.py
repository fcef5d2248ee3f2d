"""MIAN: Multi-Interactive Attention Network (Zhang et al., WSDM 2021), §3.2, read as
docs/model.md records. Shapes: B batch, T behaviours, D embed_dim per field, d_i = D * #item
fields (width of e_i), d_b = D * #behaviour fields (of e_b^t), J user, K context fields."""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax.numpy as jnp

from mian_jax.errors import ConfigError
from mian_jax.models import base, layers

GIM_PARTS = ("e_i", "e_c", "e_b", "e_u", "R_ibim", "R_iuim", "R_icim")  # r_1..r_7 of eq. (14)


class MIAN(base.DeepModel):
  """Embedding, multi-interactive and prediction layers: batch -> (logits [B] float32, aux),
  aux["attention"] the enabled modules' weights "ibim" [B, T], "iuim" [B, J], "icim" [B, K],
  "gim" [B, L] (`gim_part_names()`), aux["embedding_sq_norm"] [B] (for L2)."""
  num_heads: int
  ffn_dim_multiplier: int
  transformer: Literal[layers.TransformerNorm, "none"]  # Table 4
  position_embedding: Literal["learned", "none"]  # by recency; "none": no table
  use_ibim: bool
  use_iuim: bool
  use_icim: bool
  use_gim: bool
  ibim_score_weights: Literal["shared", "per_position"]  # W_t of eq. 8
  ibim_score: Literal["additive", "bilinear", "din"]  # extra match term in eq. 8's activation
  attention_mlp_dims: tuple[int, ...]  # hidden widths of the "din" score
  interaction_values: Literal["concat", "concat_product"]  # values of eqs. 6, 10, 12
  field_score_weights: Literal["per_field", "shared"]  # W^j of eqs. 10, 13
  score_activation: layers.ScoreActivation  # eqs. 8, 10, 13, 15
  gim_combine: layers.GimCombine  # eq. 15
  gim_dim: int
  gim_behavior: Literal["concat", "mean"]  # how e_b enters r_g (eq. 14)
  history_layout: Literal["newest_first", "oldest_first"]  # slot order the model sees

  @nn.compact
  def __call__(self, batch, *, train: bool):
    kernel_init = self.kernel_init()
    oldest_first = self.history_layout == "oldest_first"
    if oldest_first:
      batch = base.oldest_first(batch)
    # Embedding layer, eqs. (1)-(2); candidate and behaviours share the item tables.
    e = self.embed(batch)
    e_i = layers.flatten_fields(e.item)                                     # [B, d_i]
    e_b = layers.flatten_fields(e.hist)                                     # [B, T, d_b]
    attention = {}
    parts = {"e_i": e_i, "e_c": layers.flatten_fields(e.context),
             "e_u": layers.flatten_fields(e.user)}
    if e_b is not None:
      parts["e_b"] = layers.flatten_fields(e_b if self.gim_behavior == "concat"
                                           else layers.pool_sequence(e.hist, e.mask, "mean"))

    # Multi-interactive layer, §3.2.2.
    if self.use_ibim and e_b is not None:
      parts["R_ibim"], attention["ibim"] = self._ibim(e, e_i, e_b, batch["hist_len"], train)
      if oldest_first:  # report weights in storage order
        attention["ibim"] = layers.reverse_valid(attention["ibim"], batch["hist_len"])
    for name, use, fields in (("iuim", self.use_iuim, e.user), ("icim", self.use_icim, e.context)):
      if use and fields is not None:
        parts[f"R_{name}"], attention[name] = self._field_interaction(e_i, fields, name)

    names = self.gim_part_names()
    assert set(names) == {p for p, x in parts.items() if x is not None}, (names, parts.keys())
    if self.use_gim:  # eqs. (14)-(15)
      r_g, attention["gim"] = layers.GlobalAttention(
          self.gim_combine, self.gim_dim, kernel_init, self.score_activation,
          name="gim")([parts[p] for p in names])
    else:  # ablation: plain concatenation of the same parts
      r_g = jnp.concatenate([parts[p] for p in names], axis=-1)

    # Prediction layer, eqs. (16)-(17). A 2-way softmax is a sigmoid of one logit.
    r_h = self.mlp(r_g, train=train)
    logits = nn.Dense(1, kernel_init=kernel_init, dtype=jnp.float32, name="logit")(r_h)[:, 0]
    return logits.astype(jnp.float32), {"attention": attention, "embedding_sq_norm": e.sq_norm}

  def gim_part_names(self) -> tuple[str, ...]:
    """Names of the parts of r_g (eq. 14) this configuration builds, in order."""
    f = self.features
    b, u, c = bool(f.behavior_fields), bool(f.user_fields), bool(f.context_fields)
    present = (True, c, b, u, self.use_ibim and b, self.use_iuim and u, self.use_icim and c)
    return tuple(p for p, keep in zip(GIM_PARTS, present) if keep)

  def _ibim(self, e, e_i, e_b, lengths, train):
    """IBIM, eqs. (3)-(9). e_i: [B, d_i]; e_b: [B, T, d_b] in `history_layout` order; lengths:
    [B]. Returns (R_ibim, alpha_t [B, T])."""
    kernel_init, mask, t = self.kernel_init(), e.mask, e_b.shape[1]
    query = base.candidate_query(self.features, e.item)  # [B, d_b]
    h_b = e_b
    if self.transformer != "none":
      if e_b.shape[-1] % self.num_heads:
        raise ConfigError(f"model.num_heads={self.num_heads} must divide the behaviour width "
                          f"{e_b.shape[-1]} (embed_dim x {len(self.features.behavior_fields)} "
                          "behaviour fields)")
      if self.position_embedding == "learned":  # indexed by recency (0 = most recent)
        table = self.param("position_embedding", nn.initializers.truncated_normal(self.init_std),
                           (t, e_b.shape[-1]))
        recency = jnp.arange(t)[None, :]  # newest first: slot t is recency t
        if self.history_layout == "oldest_first":
          recency = jnp.clip(lengths[:, None] - 1 - recency, 0, t - 1)
        h_b = h_b + table[recency]
      h_b = layers.TransformerBlock(
          num_heads=self.num_heads, ffn_dim=self.ffn_dim_multiplier * e_b.shape[-1],
          dropout_rate=self.dropout_rate, kernel_init=kernel_init, norm=self.transformer,
          dropout_rng=self.dropout_rng, name="transformer")(h_b, mask, deterministic=not train)
    parts = [jnp.broadcast_to(e_i[:, None, :], (*h_b.shape[:2], e_i.shape[-1])), h_b]
    if self.interaction_values == "concat_product":
      # In the embedding space the candidate shares with its behaviours (h_t is normalised).
      parts.append(query[:, None, :] * e_b)
    v = jnp.concatenate(parts, axis=-1)                                 # eq. (6): [B, T, d_v]
    match = None  # a candidate-behaviour match term inside eq. 8's activation (docs/model.md)
    if self.ibim_score == "bilinear":
      w = self.param("ibim_bilinear", kernel_init, (e_i.shape[-1], h_b.shape[-1]))
      match = jnp.einsum("bi,ij,btj->bt", e_i, w, h_b)
    elif self.ibim_score == "din":
      match = layers.LocalActivationUnit(self.attention_mlp_dims, kernel_init,
                                         name="ibim_activation_unit")(query, h_b, mask)
    return layers.AttentionPool(self.ibim_score_weights == "per_position", kernel_init,
                                self.score_activation, name="ibim_attention")(v, mask, match)

  def _field_interaction(self, e_i, e_fields, name):
    """IUIM eqs. (10)-(11) / ICIM eqs. (12)-(13). e_fields: [B, J, D] -> ([B, d_v], [B, J]),
    d_v = d_i + D, or d_i + 2D with "concat_product" (+ (e_i P) * e^j, P: [d_i, D] learned)."""
    kernel_init = self.kernel_init()
    parts = [jnp.broadcast_to(e_i[:, None, :], (*e_fields.shape[:2], e_i.shape[-1])), e_fields]
    if self.interaction_values == "concat_product":
      projected = nn.Dense(e_fields.shape[-1], use_bias=False, kernel_init=kernel_init,
                           name=f"{name}_candidate_projection")(e_i)
      parts.append(projected[:, None, :] * e_fields)
    return layers.AttentionPool(self.field_score_weights == "per_field", kernel_init,
                                self.score_activation, name=f"{name}_attention")(
                                    jnp.concatenate(parts, -1))
