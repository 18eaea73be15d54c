"""The part of torch.nn.Module that every fastopt layer shares: the training
flag and gradient zeroing over ``gradients()``."""


class Layer:
    training = True

    def train(self, mode=True):
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
