"""MIAN: Multi-Interactive Attention Network (Zhang et al., WSDM 2021), §3.2.

Shapes: B batch, T behaviours, D embed_dim per field, d_i = D * #item fields (width of e_i),
d_b = D * #behaviour fields (width of e_b^t), J user fields, K context fields.
Every reading of an ambiguous equation is recorded in docs/model.md.
"""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from mian_jax.errors import ConfigError
from mian_jax.models import base, layers

# Names of the parts r_1..r_7 of eq. (14), in the paper's order.
GIM_PARTS = ("e_i", "e_c", "e_b", "e_u", "R_ibim", "R_iuim", "R_icim")


class MIAN(base.DeepModel, kw_only=True):
  """The whole model: embedding layer, multi-interactive layer, prediction layer.

  Call with a batch (see mian_jax.data.pipeline.gather_batch); returns
  (logits [B] float32, aux) where aux holds the attention weights
  {"ibim": [B, T], "iuim": [B, J], "icim": [B, K], "gim": [B, L]} of the enabled modules (the
  L parts are named by `gim_part_names()`), and "embedding_sq_norm" [B], the squared norm of
  the embeddings each example looked up (for the L2 term). The fields have no defaults:
  `models.create_model` fills them from config.model, whose defaults are the only ones.
  """
  num_heads: int
  ffn_dim_multiplier: int
  transformer: Literal[layers.TransformerNorm, "none"]  # Table 4
  position_embedding: Literal["learned", "none"]  # by recency; "none": no table
  use_ibim: bool
  use_iuim: bool
  use_icim: bool
  use_gim: bool
  ibim_score_weights: Literal["shared", "per_position"]  # W_t of eq. 8
  # eq. 8's score: "additive" (the paper) | "bilinear" (+ e_i^T M h_t) | "din" (+ DIN's
  # activation unit over [q; h_t; q - h_t; q * h_t]), the extra terms inside the activation.
  ibim_score: Literal["additive", "bilinear", "din"]
  attention_mlp_dims: tuple[int, ...]  # hidden widths of the "din" score
  # Values pooled by IBIM/IUIM/ICIM: "concat" (eqs. 6, 10, 12) | "concat_product" (+ the
  # element-wise product of the candidate with the behaviour / field, see docs/model.md).
  interaction_values: Literal["concat", "concat_product"]
  field_score_weights: Literal["per_field", "shared"]  # W^j of eqs. 10, 13
  score_activation: layers.ScoreActivation  # eqs. 8, 10, 13, 15
  gim_combine: layers.GimCombine  # eq. 15
  gim_dim: int
  gim_behavior: Literal["concat", "mean"]  # how e_b enters r_g (eq. 14)
  # Slot order the model sees: "newest_first" (as stored: slot t = recency t) | "oldest_first"
  # (left-aligned, the layout before prepared-data format 2; for the controlled comparison).
  history_layout: Literal["newest_first", "oldest_first"]

  @nn.compact
  def __call__(self, batch, *, train: bool):
    f = self.features
    deterministic = not train
    kernel_init = self.kernel_init()
    if self.history_layout == "oldest_first":
      batch = {**batch, "hist": {k: layers.reverse_valid(v, batch["hist_len"])
                                 for k, v in batch["hist"].items()}}
    # Embedding layer, eqs. (1)-(2); candidate and behaviours share the item tables.
    e = self.embed(batch)
    e_i = layers.flatten_fields(e.item)                                     # [B, d_i]
    hist_mask = e.mask                                                      # [B, T]
    has_hist = e.hist is not None
    e_b = layers.flatten_fields(e.hist) if has_hist else None               # [B, T, d_b]
    e_u, e_c = e.user, e.context                                            # [B, J|K, D]
    sq_norm = e.sq_norm

    attention, parts = {}, {"e_i": e_i}
    if e_c is not None:
      parts["e_c"] = layers.flatten_fields(e_c)
    if has_hist:
      parts["e_b"] = (layers.flatten_fields(e_b) if self.gim_behavior == "concat"
                      else _masked_mean(e_b, hist_mask))
    if e_u is not None:
      parts["e_u"] = layers.flatten_fields(e_u)

    # Multi-interactive layer, §3.2.2.
    if self.use_ibim and has_hist:
      parts["R_ibim"], attention["ibim"] = self._ibim(
          e_i, base.candidate_query(f, e.item), e_b, hist_mask, batch["hist_len"], kernel_init,
          deterministic)
      if self.history_layout == "oldest_first":  # report weights in storage order
        attention["ibim"] = layers.reverse_valid(attention["ibim"], batch["hist_len"])
    if self.use_iuim and e_u is not None:
      parts["R_iuim"], attention["iuim"] = self._field_interaction(e_i, e_u, kernel_init, "iuim")
    if self.use_icim and e_c is not None:
      parts["R_icim"], attention["icim"] = self._field_interaction(e_i, e_c, kernel_init, "icim")

    names = self.gim_part_names()
    assert set(names) == set(parts), (names, tuple(parts))
    if self.use_gim:  # eqs. (14)-(15)
      r_g, attention["gim"] = layers.GlobalAttention(
          self.gim_combine, self.gim_dim, kernel_init, self.score_activation,
          name="gim")([parts[p] for p in names])
    else:  # ablation: plain concatenation of the same parts
      r_g = jnp.concatenate([parts[p] for p in names], axis=-1)

    # Prediction layer, eqs. (16)-(17). A 2-way softmax is a sigmoid of one logit.
    r_h = layers.MLP(self.mlp_dims, self.dropout_rate, kernel_init, self.dropout_rng, name="mlp")(
        r_g, deterministic=deterministic)
    logits = nn.Dense(1, kernel_init=kernel_init,
                      dtype=jnp.float32, name="logit")(r_h)[:, 0]
    return logits.astype(jnp.float32), {"attention": attention, "embedding_sq_norm": sq_norm}

  def gim_part_names(self) -> tuple[str, ...]:
    """Names of the parts of r_g (eq. 14) this configuration builds, in order."""
    f = self.features
    present = {"e_i": True, "e_c": bool(f.context_fields), "e_b": bool(f.behavior_fields),
               "e_u": bool(f.user_fields),
               "R_ibim": self.use_ibim and bool(f.behavior_fields),
               "R_iuim": self.use_iuim and bool(f.user_fields),
               "R_icim": self.use_icim and bool(f.context_fields)}
    return tuple(p for p in GIM_PARTS if present[p])

  def _ibim(self, e_i, query, e_b, mask, lengths, kernel_init, deterministic):
    """IBIM, eqs. (3)-(9). e_i: [B, d_i]; query: [B, d_b], the candidate's behaviour fields;
    e_b: [B, T, d_b] in `history_layout` order; lengths: [B]. Returns (R_ibim, alpha_t [B, T])."""
    t = e_b.shape[1]
    h_b = e_b
    if self.transformer != "none":
      if e_b.shape[-1] % self.num_heads:
        raise ConfigError(f"model.num_heads={self.num_heads} must divide the behaviour width "
                          f"{e_b.shape[-1]} (embed_dim x {len(self.features.behavior_fields)} "
                          "behaviour fields)")
      if self.position_embedding == "learned":
        # Indexed by recency (0 = most recent), whatever the length of the history: with
        # newest-first storage, slot t is recency t.
        table = self.param("position_embedding", layers.truncated_normal(self.init_std),
                           (t, e_b.shape[-1]))
        if self.history_layout == "oldest_first":
          recency = jnp.clip(lengths[:, None] - 1 - jnp.arange(t)[None, :], 0, t - 1)
          h_b = h_b + table[recency]
        else:
          h_b = h_b + table[None]
      h_b = layers.TransformerBlock(
          num_heads=self.num_heads, ffn_dim=self.ffn_dim_multiplier * e_b.shape[-1],
          dropout_rate=self.dropout_rate, kernel_init=kernel_init, norm=self.transformer,
          dropout_rng=self.dropout_rng,
          name="transformer")(h_b, mask, deterministic=deterministic)
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

  def _field_interaction(self, e_i, e_fields, kernel_init, name):
    """IUIM eqs. (10)-(11) / ICIM eqs. (12)-(13). e_fields: [B, J, D] -> ([B, d_v], [B, J]),
    d_v = d_i + D, or d_i + 2D with "concat_product" (+ (e_i P) * e^j, P: [d_i, D] learned)."""
    shape = (*e_fields.shape[:2], e_i.shape[-1])
    parts = [jnp.broadcast_to(e_i[:, None, :], shape), e_fields]
    if self.interaction_values == "concat_product":
      projected = nn.Dense(e_fields.shape[-1], use_bias=False, kernel_init=kernel_init,
                           name=f"{name}_candidate_projection")(e_i)
      parts.append(projected[:, None, :] * e_fields)
    return layers.AttentionPool(self.field_score_weights == "per_field", kernel_init,
                                self.score_activation, name=f"{name}_attention")(
                                    jnp.concatenate(parts, -1))


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """[B, T, d] -> [B, d], the mean over valid positions (zeros for an empty history)."""
  count = jnp.maximum(mask.sum(-1, keepdims=True), 1)
  return (x * mask[..., None]).sum(1) / count
