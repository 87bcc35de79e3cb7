"""Frozen-feature evaluation: a frozen encoder's pooled features, then a linear softmax
classifier (linear probe) or a k-nearest-neighbour vote (k-NN).

Cheap enough to run after every pretraining: features are extracted once, and the classifier is
full-batch AdamW on standardised features in one jitted `lax.scan`. The k-NN needs no training at
all, so it also scores features that a linear layer could not separate.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax


def extract_features(encoder, params, batches) -> tuple[np.ndarray, np.ndarray]:
  """Pooled features [N, C] and labels [N] of every real (unpadded) example in `batches`."""
  apply = jax.jit(lambda p, x: encoder.apply({"params": p}, x))
  feats, labels = [], []
  for batch in batches:
    keep = batch.get("mask", np.ones(len(batch["label"]), bool)).astype(bool)
    feats.append(np.asarray(apply(params, batch["image"]))[keep])
    labels.append(np.asarray(batch["label"])[keep])
  return np.concatenate(feats), np.concatenate(labels)


def fit_linear_classifier(x: np.ndarray, y: np.ndarray, num_classes: int, steps: int = 500,
                          learning_rate: float = 0.05, weight_decay: float = 1e-3):
  """-> (predict_fn, train_accuracy). Features are standardised with the training statistics."""
  mean, std = x.mean(0), x.std(0) + 1e-6
  w = _fit_softmax(jnp.asarray((x - mean) / std), jnp.asarray(y), num_classes, steps,
                   learning_rate, weight_decay)
  predict = lambda f: np.asarray(jnp.argmax(((f - mean) / std) @ w["kernel"] + w["bias"], -1))
  return predict, float((predict(x) == y).mean())


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _fit_softmax(xs, ys, num_classes: int, steps: int, learning_rate: float,
                 weight_decay: float) -> dict:
  """Full-batch AdamW from zero weights. The features are arguments, not constants, so probes
  of features of one shape (a study's every encoder) share one compiled program."""
  tx = optax.adamw(learning_rate, weight_decay=weight_decay)
  w = {"kernel": jnp.zeros((xs.shape[1], num_classes)), "bias": jnp.zeros((num_classes,))}

  def loss(w):
    logits = xs @ w["kernel"] + w["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, ys).mean()

  def step(carry, _):
    w, opt = carry
    grads = jax.grad(loss)(w)
    updates, opt = tx.update(grads, opt, w)
    return (optax.apply_updates(w, updates), opt), None

  (w, _), _ = jax.lax.scan(step, (w, tx.init(w)), None, length=steps)
  return w


def linear_probe_accuracy(train_xy, test_xy, num_classes: int) -> float:
  predict, _ = fit_linear_classifier(*train_xy, num_classes)
  x, y = test_xy
  return float((predict(x) == y).mean())


def knn_accuracy(train_xy, test_xy, num_classes: int, k: int = 20, chunk: int = 1024) -> float:
  """Top-1 of a k-nearest-neighbour majority vote on cosine similarity.

  Each test feature takes the most common label of its k most similar training features; a tied
  vote goes to the class whose neighbours are the more similar in total. On the device, `chunk`
  test features at a time against all training features (memory: chunk x train similarities),
  so Fashion-MNIST's 10,000 x 60,000 fits anywhere.
  """
  (x_train, y_train), (x_test, y_test) = train_xy, test_xy
  k = min(k, len(y_train))
  train = _unit(jnp.asarray(x_train, jnp.float32))
  labels = jnp.asarray(y_train, jnp.int32)
  x_test = np.asarray(x_test, np.float32)
  chunk = min(chunk, len(x_test))
  predictions = []
  for start in range(0, len(x_test), chunk):
    part = x_test[start:start + chunk]
    real = len(part)
    part = np.pad(part, ((0, chunk - real), (0, 0)))  # one shape, one compilation
    predictions.append(np.asarray(_knn_predict(train, labels, jnp.asarray(part), k,
                                               num_classes))[:real])
  return float((np.concatenate(predictions) == np.asarray(y_test)).mean())


def _unit(f: jax.Array) -> jax.Array:
  return f / jnp.maximum(jnp.linalg.norm(f, axis=1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _knn_predict(train_unit, train_labels, test, k: int, num_classes: int) -> jax.Array:
  similarity = jnp.matmul(_unit(test), train_unit.T, precision=jax.lax.Precision.HIGHEST)
  nearest_sim, nearest = jax.lax.top_k(similarity, k)
  votes = jax.nn.one_hot(train_labels[nearest], num_classes)  # [chunk, k, classes]
  # The tie-break: a class's summed similarity lies in [-k, k], so scaled by 1 / (2k + 2) it
  # moves a class's score by less than 1/2 and never overturns a difference in counts.
  scores = jnp.sum(votes * (1.0 + nearest_sim[..., None] / (2 * k + 2)), axis=1)
  return jnp.argmax(scores, axis=-1)
