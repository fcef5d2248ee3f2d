"""Deep & Cross Network (Wang et al. 2017). Readings: docs/baselines.md.

Shapes: B batch, F fields, D embed_dim, d = F * D (width of x_0).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mian_jax.models import base, layers


class DCN(base.DeepModel):
  """Embedding and stacking layer x_0 = [x_embed,1; ...; x_embed,F] (eq. 1), a cross network
  (eq. 3, `layers.CrossNetwork`) beside a deep network (eq. 4), and the combination layer
  p = sigmoid(w_logit^T [x_L1; h_L2] + b_logit) (eq. 5)."""
  sequence_pooling: layers.SequencePooling = "mean"
  cross_layers: int = 3

  @nn.compact
  def __call__(self, batch, *, train: bool):
    kernel_init = self.kernel_init()
    e = self.embed(batch)
    fields = layers.stack_fields(e, self.sequence_pooling)                 # [B, F, D]
    x0 = fields.reshape(fields.shape[0], -1)                               # [B, d]
    cross = layers.CrossNetwork(self.cross_layers, kernel_init, name="cross")(x0)
    deep = layers.MLP(self.mlp_dims, self.dropout_rate, kernel_init, self.dropout_rng,
                      name="mlp")(x0, deterministic=not train)
    logits = nn.Dense(1, kernel_init=kernel_init, name="logit")(
        jnp.concatenate([cross, deep], axis=-1))[:, 0]
    return logits.astype(jnp.float32), {"attention": {}, "embedding_sq_norm": e.sq_norm}
