"""Layers with the interface of ``torch.nn`` on NumPy arrays, with explicit backward."""
# Recurrent layers (RNN, LSTM, GRU and their cells) live in _nn_rnn.py.
from ._nn_rnn import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell  # noqa: F401
# Batch norm and dropout live in _nn_norm.py.
from ._nn_norm import BatchNorm, Dropout  # noqa: F401
