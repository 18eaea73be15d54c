"""fastopt: fused C kernels for neural-network training on NumPy arrays."""
from ._fastopt import get_num_threads, has_openmp, set_num_threads
from .optim import SGD, Adagrad, Adam, AdamW, Optimizer, RMSprop
from .nn import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell
from .nn import BatchNorm, Dropout
from .blas import get_blas, set_blas
from . import functional

__version__ = "0.1.0"

__all__ = ["set_num_threads", "get_num_threads", "has_openmp",
           "Optimizer", "SGD", "Adagrad", "RMSprop", "Adam", "AdamW",
           "RNNCell", "LSTMCell", "GRUCell", "RNN", "LSTM", "GRU", "set_blas", "get_blas",
           "BatchNorm", "Dropout", "functional"]
