"""MNIST loading (embedded real digits or standard IDX files; never downloads).

Example:
  >>> from approx_jax import data
  >>> x_train, y_train, x_test, y_test = data.load_mnist()   # 4,000 / 1,000 real digits
"""

from approx_jax._src.data import batches, load_mnist, load_mnist_idx, read_idx

__all__ = ["batches", "load_mnist", "load_mnist_idx", "read_idx"]
