"""DeepFM (Guo et al. 2017) and xDeepFM (Lian et al. 2018), read as docs/baselines.md says.
Shapes: B batch, F = m fields, D embed_dim."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mian_jax.models import base, layers


class DeepFM(base.FieldListModel):
  """y = sigmoid(y_FM + y_DNN) (eq. 1). y_FM = <w, x> + sum_{i<j} <V_i, V_j> x_i x_j (eq. 2:
  `LinearTerm` + `layers.fm_second_order`); y_DNN = an MLP over the same field embeddings V
  (eqs. 3-4), which the FM component and the deep component share."""

  @nn.compact
  def __call__(self, batch, *, train: bool):
    first, deep, v, sq_norm = self.linear_and_deep(batch, "linear", train=train)
    logits = first + layers.fm_second_order(v) + deep
    return logits.astype(jnp.float32), {"attention": {}, "embedding_sq_norm": sq_norm}


class XDeepFM(base.FieldListModel):
  """y = sigmoid(w_linear^T a + w_dnn^T x_dnn + w_cin^T p+ + b) (eq. 11): a linear part
  (`LinearTerm`), a plain DNN and a Compressed Interaction Network (`layers.CIN`), the last
  two over the same field embeddings X^0 [B, m, D]."""
  cin_layer_sizes: tuple[int, ...]

  @nn.compact
  def __call__(self, batch, *, train: bool):
    kernel_init = self.kernel_init()
    linear, deep, x0, sq_norm = self.linear_and_deep(batch, "linear", train=train)
    p_plus = layers.CIN(self.cin_layer_sizes, kernel_init, name="cin")(x0)
    cin = nn.Dense(1, use_bias=False, kernel_init=kernel_init, name="cin_logit")(p_plus)[:, 0]
    logits = linear + deep + cin
    return logits.astype(jnp.float32), {"attention": {}, "embedding_sq_norm": sq_norm}
