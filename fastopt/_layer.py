"""The part of torch.nn.Module that every fastopt layer shares: the training
flag and gradient zeroing over ``gradients()``."""
import numpy as np


class Layer:
    training = True

    def train(self, mode=True):
        # as torch's Module.train: a non-bool mode ("no" is truthy) is refused
        if not isinstance(mode, (bool, np.bool_)):
            raise TypeError(f"mode must be a bool, got {type(mode).__name__} {mode!r}")
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def parameters(self):
        return []

    def gradients(self):
        return []

    def zero_grad(self):
        for g in self.gradients():
            g.fill(0)
