"""Deep Interest Network (Zhou et al. 2018), read as docs/baselines.md says. Shapes: B batch,
T behaviours, d_b = embed_dim * #behaviour fields (width of a behaviour and of the query q)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mian_jax.models import base, layers


class DIN(base.InterestModel):
  """User interest v_U = sum_t a_t e_b^t (eq. 3), a_t from the local activation unit
  (`layers.LocalActivationUnit`, normalised as `din_attention_norm` says), then the MLP (Fig. 2)
  over [e_u; v_U; e_i; e_c] ("paper") or [e_u; v_U; e_i; e_c; v_U * q] ("reference").
  aux["attention"]["din"]: a_t [B, T], zero at padding."""
  attention_mlp_dims: tuple[int, ...]
  din_attention_norm: layers.DinAttentionNorm

  @nn.compact
  def __call__(self, batch, *, train: bool):
    base.require_behaviours(self.features, "din")
    e = self.embed(batch)
    keys = layers.flatten_fields(e.hist)                                   # [B, T, d_b]
    query = base.candidate_query(self.features, e.item)                    # [B, d_b]
    weights = layers.LocalActivationUnit(self.attention_mlp_dims, self.kernel_init(),
                                         self.use_dice, self.din_attention_norm,
                                         name="activation_unit")(query, keys, e.mask)
    interest = jnp.einsum("bt,btd->bd", weights, keys)                     # eq. 3
    parts = [base.flat(e.user), interest, base.flat(e.item), base.flat(e.context)]
    if self.baseline_inputs == "reference":
      parts.append(interest * query)
    logits = self.head(parts, train=train)
    return logits.astype(jnp.float32), {"attention": {"din": weights},
                                        "embedding_sq_norm": e.sq_norm}
