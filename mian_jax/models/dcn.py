"""Deep & Cross Network (Wang et al. 2017), read as docs/baselines.md says.
Shapes: B batch, F fields, D embed_dim, d = F * D (width of x_0)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mian_jax.models import base, layers


class DCN(base.FieldListModel):
  """Embedding and stacking layer x_0 = [x_embed,1; ...; x_embed,F] (eq. 1), a cross network
  (eq. 3, `layers.CrossNetwork`) beside a deep network (eq. 4), and the combination layer
  p = sigmoid(w_logit^T [x_L1; h_L2] + b_logit) (eq. 5)."""
  cross_layers: int

  @nn.compact
  def __call__(self, batch, *, train: bool):
    e = self.embed(batch)
    fields = layers.stack_fields(e, self.sequence_pooling)                 # [B, F, D]
    x0 = fields.reshape(fields.shape[0], -1)                               # [B, d]
    cross = layers.CrossNetwork(self.cross_layers, self.kernel_init(), name="cross")(x0)
    logits = nn.Dense(1, kernel_init=self.kernel_init(), name="logit")(
        jnp.concatenate([cross, self.mlp(x0, train=train)], axis=-1))[:, 0]
    return logits.astype(jnp.float32), {"attention": {}, "embedding_sq_norm": e.sq_norm}
