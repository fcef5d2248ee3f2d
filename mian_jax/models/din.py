"""Deep Interest Network (Zhou et al. 2018). Readings: docs/baselines.md.

Shapes: B batch, T behaviours, D embed_dim, d_i = D * #item fields, d_b = D * #behaviour
fields (width of a behaviour, and of the candidate's behaviour fields, the query), J user
fields, K context fields.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mian_jax.models import base, layers

class DIN(base.DeepModel):
  """User interest v_U = sum_t a_t e_b^t (eq. 3) with the local activation unit
  (`layers.LocalActivationUnit`: weights a_t normalised as `din_attention_norm` says, sum
  pooling), then an MLP with PReLU or Dice (Fig. 2) and a logit layer, over

    "paper":     [e_u; v_U; e_i; e_c]             (Fig. 2)
    "reference": [e_u; v_U; e_i; e_c; v_U * q]    (+ the interest-candidate product of the
                                                   authors' din/model.py)

  with q the candidate's behaviour fields (the layout of e_b^t and so of v_U).
  aux["attention"]["din"]: the weights a_t [B, T] (zero at padding).
  """
  attention_mlp_dims: tuple[int, ...] = (36,)
  use_dice: bool = False
  din_attention_norm: layers.DinAttentionNorm = "scaled_softmax"
  baseline_inputs: base.BaselineInputs = "reference"

  @nn.compact
  def __call__(self, batch, *, train: bool):
    base.require_behaviours(self.features, "din")
    kernel_init = self.kernel_init()
    e = self.embed(batch)
    keys = layers.flatten_fields(e.hist)                                          # [B, T, d_b]
    query = base.candidate_query(self.features, e.item)                    # [B, d_b]
    weights = layers.LocalActivationUnit(self.attention_mlp_dims, kernel_init, self.use_dice,
                                         self.din_attention_norm,
                                         name="activation_unit")(query, keys, e.mask)
    interest = jnp.einsum("bt,btd->bd", weights, keys)                     # eq. 3
    parts = [layers.flatten_fields(x) for x in (e.user,) if x is not None]
    parts += [interest, layers.flatten_fields(e.item)]
    parts += [layers.flatten_fields(x) for x in (e.context,) if x is not None]
    if self.baseline_inputs == "reference":
      parts.append(interest * query)
    h = layers.ActivationMLP(self.mlp_dims, self.dropout_rate, kernel_init, self.use_dice,
                             self.dropout_rng, name="mlp")(jnp.concatenate(parts, -1),
                                                           deterministic=not train)
    logits = nn.Dense(1, kernel_init=kernel_init, name="logit")(h)[:, 0]
    return logits.astype(jnp.float32), {"attention": {"din": weights},
                                        "embedding_sq_norm": e.sq_norm}
