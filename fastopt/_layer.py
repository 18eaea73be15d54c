"""The part of torch.nn.Module that every fastopt layer shares: the training
flag, gradient zeroing over ``gradients()``, and state_dict()/load_state_dict()
over the arrays a layer names as torch does."""
import functools
import threading
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

_LOCK_GUARD = threading.Lock()


def one_call_at_a_time(method):
    """Serialize the calls of `method` on one object (with the other methods
    so marked). Layers and optimizers reuse their buffers and state from call
    to call: two threads in one object at once computed over each other's
    numbers (a shared LSTM's outputs came out wrong, a shared Adam lost
    updates). Different objects still run at once, their kernels without the
    GIL."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            lock = self._call_lock
        except AttributeError:   # made on first use; pickle and deepcopy leave it out
            with _LOCK_GUARD:
                lock = self.__dict__.setdefault("_call_lock", threading.RLock())
        # acquire/release rather than `with`: half the cost (0.15 against 0.3 us
        # here), which an Adam step on 10^4 elements (6.5 us) notices
        lock.acquire()
        try:
            return method(self, *args, **kwargs)
        finally:
            lock.release()
    return call


def state_without_lock(obj):
    """obj.__dict__ for pickle and copy.deepcopy, without the lock (a lock
    cannot be pickled; a copy makes its own)."""
    state = dict(obj.__dict__)
    state.pop("_call_lock", None)
    return state


class Layer:
    training = True

    def __getstate__(self):
        return state_without_lock(self)

    def train(self, mode=True):
        """Training mode (True) or eval mode (False), as torch's Module.train;
        returns the layer."""
        # as torch's Module.train: a non-bool mode ("no" is truthy) is refused
        if not isinstance(mode, (bool, np.bool_)):
            raise TypeError(f"mode must be a bool, got {type(mode).__name__} {mode!r}")
        self.training = bool(mode)
        return self

    def eval(self):
        """Eval mode (train(False)); returns the layer."""
        return self.train(False)

    def parameters(self):
        """The parameter arrays (updated in place by optimizers)."""
        return []

    def gradients(self):
        """gradients()[i] is the accumulated gradient of parameters()[i]."""
        return []

    def named_parameters(self):
        """[(torch name, parameter array)], in parameters() order."""
        names = {id(v): k for k, v in self._named_arrays().items()}
        return [(names[id(p)], p) for p in self.parameters()]

    @one_call_at_a_time
    def zero_grad(self):
        """Set every accumulated gradient to 0, in place."""
        for g in self.gradients():
            g.fill(0)

    def _named_arrays(self):
        """{torch name: the layer's own array} (parameters and buffers)."""
        return OrderedDict()

    def _check_loaded(self, arrays):
        """Refuse loaded values ({name: array}, shapes and dtypes already
        checked) that the layer's own rules forbid; nothing is written yet."""

    @one_call_at_a_time
    def state_dict(self):
        """{torch name: copy of the array}, e.g. weight_ih_l0 or running_mean."""
        return OrderedDict((k, v.copy()) for k, v in self._named_arrays().items())

    @one_call_at_a_time
    def load_state_dict(self, state_dict):
        """Copy arrays by torch name into the layer's own (in place, so optimizers
        holding them see the new values); a torch module's state_dict() works as
        it is. Refused whole, before anything is written, when a name is missing
        or unexpected, a value cannot be read as an array, a shape or dtype
        differs (no casts: a float32 layer takes float32 values, as a torch
        module's state_dict() gives them) or a value breaks the layer's own
        rules (BatchNorm's num_batches_tracked in [0, 2**63))."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping of name -> array, "
                            f"got {type(state_dict).__name__}")
        targets = self._named_arrays()
        missing = [k for k in targets if k not in state_dict]
        unexpected = [k for k in state_dict if k not in targets]
        if missing or unexpected:
            raise ValueError(f"state_dict does not fit: missing {missing}, unexpected {unexpected}")
        arrays = {}
        for k, p in targets.items():
            v = state_dict[k]
            try:      # a tensor (any device, requiring grad or not: it is copied) or array-like
                v = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
            except Exception as e:   # ragged lists; bfloat16 or meta tensors
                raise TypeError(f"state_dict[{k!r}] cannot be read as an array: {e}") from None
            if v.shape != p.shape:
                raise ValueError(f"state_dict[{k!r}] has shape {v.shape}, expected {p.shape}")
            if v.dtype != p.dtype:
                raise TypeError(f"state_dict[{k!r}] has dtype {v.dtype}, expected {p.dtype} "
                                "(no implicit casts)")
            arrays[k] = v
        self._check_loaded(arrays)
        # copies of every value before the first write: a value may be (a view
        # of) one of our own arrays, e.g. two same-shaped weights swapped
        arrays = {k: v.copy() for k, v in arrays.items()}
        for k, v in arrays.items():
            np.copyto(targets[k], v)
