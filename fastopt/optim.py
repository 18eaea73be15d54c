"""Optimizers on NumPy arrays with the interface of ``torch.optim``.

Each class holds its param groups and state arrays; ``step(grads)`` checks every
gradient of every group, then makes one multi-tensor C call per group, updating
the params and state in place. Formulas and defaults are PyTorch's (see
DESIGN.md), plus ``l1``: the L1 subgradient ``l1*sign(p)`` added to the gradient
inside the same kernel (decoupled in AdamW, like its weight decay).
"""
import math
from collections.abc import Mapping, Set

import numpy as np

from . import _fastopt
from ._functional_norm import _real
from ._layer import one_call_at_a_time, state_without_lock

__all__ = ["Optimizer", "SGD", "Adagrad", "RMSprop", "Adam", "AdamW"]


def _one_array(obj):
    """True for one array (an ndarray, a tensor, a memoryview, any buffer): a
    group's 'params' given so means [obj], as torch takes one tensor."""
    return (isinstance(obj, (np.ndarray, memoryview))
            or any(hasattr(obj, a) for a in ("__array__", "__array_interface__", "__dlpack__")))


def _not_a_list_of_arrays(obj):
    """True for what would iterate into something other than the arrays meant:
    one array (an ndarray, a tensor, a memoryview: its rows), a str, or a
    mapping or set (its keys, in no fixed order)."""
    if type(obj) is list or type(obj) is tuple:   # the usual case, without the ABC checks
        return False
    return (_one_array(obj) or isinstance(obj, (str, bytes, Mapping, Set))
            or not hasattr(obj, "__iter__"))


def _check_scalar(group, key, lo=None, hi=None, lo_open=False, hi_open=False):
    """group[key] must be a real number within the bounds (NaN never is)."""
    v = _real(group[key], key)
    ok = not math.isnan(v)
    if lo is not None:
        ok = ok and (v > lo if lo_open else v >= lo)
    if hi is not None:
        ok = ok and (v < hi if hi_open else v <= hi)
    if not ok:
        lb = "" if lo is None else ("(" if lo_open else "[") + f"{lo}, "
        hb = "" if hi is None else f"{hi}" + (")" if hi_open else "]")
        rng = f"in {lb}{hb}" if lo is not None and hi is not None else (
            f"{'>' if lo_open else '>='} {lo}" if lo is not None else f"<= {hi}")
        raise ValueError(f"{key} must be {rng}, got {v}")
    return v


def _state_arrays(like, fill=0.0, data=None):
    """Arrays shaped and typed like `like` (zeros, `fill`, or copies of `data`),
    carved out of one buffer per dtype, each starting on a 64-byte line. One
    allocation instead of one per param: a model's state then sits in one
    ascending address range, and in huge pages where the kernel grants them
    (NumPy asks from 4 MB; this benchmark machine's kernel does not), so a
    step over 150 tensors walks the TLB and the prefetchers as one array
    does."""
    out = [None] * len(like)
    for dtype in {a.dtype for a in like}:
        idx = [i for i, a in enumerate(like) if a.dtype == dtype]
        per_line = max(1, 64 // dtype.itemsize)
        offsets, total = [], 0
        for i in idx:
            offsets.append(total)
            total += -(-like[i].size // per_line) * per_line
        buf = np.full(total + per_line, fill, dtype) if fill else np.zeros(total + per_line, dtype)
        start = (-buf.ctypes.data % 64) // dtype.itemsize
        for i, off in zip(idx, offsets):
            a = buf[start + off:start + off + like[i].size].reshape(like[i].shape)
            if data is not None:
                a[...] = data[i]
            out[i] = a
    return out


def _check_flag(group, key):
    """group[key] must be a bool (or numpy.bool_, or the int 0 or 1): stored as bool."""
    v = group[key]
    if not isinstance(v, (bool, np.bool_)) and not (
            isinstance(v, (int, np.integer)) and v in (0, 1)):
        raise TypeError(f"{key} must be a bool, got {type(v).__name__} {v!r}")
    group[key] = bool(v)


def _check_step(v, pid):
    """A state's 'step': a whole number in [0, 2**62] (float, int or 0-d array)."""
    try:
        f = float(np.asarray(v))
    except (TypeError, ValueError):
        raise TypeError(f"step of param {pid} must be a number, got {v!r}") from None
    if not (0 <= f <= 2.0 ** 62) or f != math.floor(f):
        raise ValueError(f"step of param {pid} must be a whole number in [0, 2**62], got {v!r}")
    return int(f)


class Optimizer:
    """Base class: param groups, state arrays, state_dict, the checked step.

    A subclass sets ``defaults``, and defines ``_validate(group)`` (range checks),
    ``_state_names(group)`` (which state arrays the options need),
    ``_state_fill(name, group)`` (their initial value), optionally
    ``_eager_state_names(group)`` (state made when the group is added, not at
    its first step), and ``_update(g, grads, group, fresh)`` (one binding call
    for one group, whose grads are already checked; ``fresh`` names the state
    arrays made for this step).
    """

    defaults = {}

    def __init__(self, params, **kwargs):
        self.defaults = dict(type(self).defaults)
        unknown = set(kwargs) - set(self.defaults)
        if unknown:
            raise TypeError(f"unexpected argument(s): {sorted(unknown)}")
        self.defaults.update(kwargs)
        self.param_groups = []
        self._groups = []   # per group: {'params': TensorTable, 'state': {name: TensorTable}, 'step': int}
        if _not_a_list_of_arrays(params):
            raise TypeError("params must be an iterable of arrays or of param-group "
                            f"dicts, got {type(params).__name__}")
        params = list(params)
        if not params:
            raise ValueError("params is an empty list")
        if not isinstance(params[0], dict):
            params = [{"params": params}]
        for g in params:
            self.add_param_group(g)

    # ---- groups ---------------------------------------------------------
    @one_call_at_a_time
    def add_param_group(self, param_group):
        """Add a dict with 'params' and optional hyperparameters (defaults fill the rest)."""
        if not isinstance(param_group, dict) or "params" not in param_group:
            raise TypeError("param_group must be a dict with a 'params' entry")
        group = dict(param_group)
        ps = group["params"]
        if _one_array(ps):
            ps = [ps]
        elif _not_a_list_of_arrays(ps):
            raise TypeError("param_group['params'] must be an array or an iterable of arrays, "
                            f"got {type(ps).__name__}")
        else:
            ps = list(ps)
        unknown = set(group) - set(self.defaults) - {"params"}
        if unknown:
            raise TypeError(f"unexpected hyperparameter(s): {sorted(unknown)}")
        for k, v in self.defaults.items():
            group.setdefault(k, v)
        arrays = [_fastopt.as_inplace_array(p, f"params[{i}]") for i, p in enumerate(ps)]
        self._validate(group)
        table = _fastopt.TensorTable(arrays, "params")
        existing = [a for g in self._groups for a in g["params"].arrays] + []
        for i, a in enumerate(arrays):
            for b in existing + arrays[:i]:
                if np.may_share_memory(a, b):
                    raise ValueError(f"params[{i}] appears (or overlaps a param) in "
                                     "more than one place")
        group["params"] = arrays
        internal = {"params": table, "state": {}, "step": 0}
        for name in self._eager_state_names(group):
            internal["state"][name] = self._new_state(name, table, group)
        self.param_groups.append(group)
        self._groups.append(internal)
        self._index = _fastopt.ParamIndex([g["params"] for g in self._groups])

    def _eager_state_names(self, group):
        return ()

    def _new_state(self, name, table, group):
        arrays = _state_arrays(table.arrays, self._state_fill(name, group))
        return _fastopt.TensorTable(arrays, name, table)

    def _state_fill(self, name, group):
        return 0.0

    # ---- step -------------------------------------------------------------
    @one_call_at_a_time
    def step(self, grads):
        """Update every param in place from grads: a sequence aligned with the
        params of all groups, in order. Checks everything before writing."""
        if _not_a_list_of_arrays(grads):
            raise TypeError(f"grads must be a sequence of arrays, got {type(grads).__name__}")
        grads = list(grads)
        if type(self.param_groups) is not list or len(self.param_groups) != len(self._groups):
            raise ValueError(f"param_groups must be a list of the {len(self._groups)} groups "
                             "added (groups are added with add_param_group, never removed)")
        if len(grads) != self._index.total:
            raise ValueError(f"grads has {len(grads)} arrays, expected {self._index.total} "
                             "(one per param, all groups in order)")
        checked, start = [], 0
        for gi, (group, g) in enumerate(zip(self.param_groups, self._groups)):
            # re-check hyperparameters only when one was edited since the last step;
            # validation lets only immutable values through (numbers, bools, betas
            # made a tuple), so an in-place edit cannot hide behind this compare
            try:
                same = group == g.get("validated")
            except (TypeError, ValueError):    # e.g. an array edited in
                same = False
            if not same:
                self._validate(group)
                g["validated"] = dict(group)
            n = g["params"].n
            checked.append(_fastopt.check_grads(g["params"], grads[start:start + n],
                                                self._index, start, group.get("params", ()), gi))
            start += n
        for group, g, gt in zip(self.param_groups, self._groups, checked):
            fresh = set()
            for name in self._state_names(group):
                if name not in g["state"]:
                    g["state"][name] = self._new_state(name, g["params"], group)
                    fresh.add(name)
            g["step"] += 1
            self._update(g, gt, group, fresh)

    # ---- state_dict -------------------------------------------------------
    @one_call_at_a_time
    def state_dict(self):
        """{'state': {index: {'step': float, name: array copy}}, 'param_groups': [...]}
        in torch's layout (params numbered across groups)."""
        state, groups, idx = {}, [], 0
        for group, g in zip(self.param_groups, self._groups):
            d = {k: v for k, v in group.items() if k != "params"}
            d["params"] = list(range(idx, idx + g["params"].n))
            groups.append(d)
            if g["step"] > 0:
                for i in range(g["params"].n):
                    s = {"step": float(g["step"])}
                    for name, t in g["state"].items():
                        s[name] = t.arrays[i].copy()
                    state[idx + i] = s
            idx += g["params"].n
        return {"state": state, "param_groups": groups}

    @one_call_at_a_time
    def load_state_dict(self, state_dict):
        """Load a dict from state_dict() (or torch's, converted to NumPy). It is
        checked whole first; if anything does not fit, nothing changes."""
        try:
            sd_groups, sd_state = state_dict["param_groups"], state_dict["state"]
        except (TypeError, KeyError):
            raise ValueError("state_dict must have 'state' and 'param_groups'") from None
        if not isinstance(sd_state, dict) or not isinstance(sd_groups, (list, tuple)) or \
                not all(isinstance(sg, dict) for sg in sd_groups):
            raise ValueError("state_dict['state'] must be a dict and "
                             "state_dict['param_groups'] a list of dicts")
        if len(sd_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(sd_groups)} param groups, "
                             f"expected {len(self.param_groups)}")
        plan = []
        for gi, (sg, g) in enumerate(zip(sd_groups, self._groups)):
            ids = list(sg.get("params", []))
            if len(ids) != g["params"].n:
                raise ValueError(f"param group {gi} has {len(ids)} params in state_dict, "
                                 f"expected {g['params'].n}")
            group = dict(self.param_groups[gi])
            group.update({k: v for k, v in sg.items() if k in self.defaults})
            self._validate(group)
            names = self._state_names(group)
            steps, arrays = set(), {n: [] for n in names}
            for i, pid in enumerate(ids):
                s = sd_state.get(pid, sd_state.get(str(pid)))
                if s is None:
                    steps.add(0)
                    continue
                if not isinstance(s, dict):
                    raise ValueError(f"state of param {pid} must be a dict, "
                                     f"got {type(s).__name__}")
                steps.add(_check_step(s.get("step", 0), pid))
                p = g["params"].arrays[i]
                for n in names:
                    a = s.get(n)
                    if a is None and n == "momentum_buffer":
                        continue        # torch keeps None before the first momentum step
                    if a is None:
                        raise ValueError(f"state of param {pid} lacks '{n}'")
                    try:
                        a = np.asarray(a)
                    except Exception as e:   # bfloat16 or requires-grad tensors, ragged lists
                        raise TypeError(f"state '{n}' of param {pid} cannot be read as an "
                                        f"array: {e}") from None
                    if a.shape != p.shape or a.dtype != p.dtype:
                        raise ValueError(f"state '{n}' of param {pid} has dtype {a.dtype} "
                                         f"shape {a.shape}, expected {p.dtype} {p.shape}")
                    arrays[n].append(a)
            if len(steps) > 1:
                raise ValueError(f"params of group {gi} have different steps {sorted(steps)}")
            step = steps.pop() if steps else 0
            for n in names:
                if arrays[n] and len(arrays[n]) != g["params"].n:
                    raise ValueError(f"state '{n}' is missing for some params of group {gi}")
            plan.append((group, step, arrays))
        for gi, (group, step, arrays) in enumerate(plan):
            group["params"] = self.param_groups[gi]["params"]
            self.param_groups[gi] = group
            g = self._groups[gi]
            g["step"] = step
            g["state"] = {}
            for n, arrs in arrays.items():
                if arrs:
                    g["state"][n] = _fastopt.TensorTable(
                        _state_arrays(g["params"].arrays, data=arrs), n, g["params"])
            for n in self._eager_state_names(group):
                if n not in g["state"]:
                    g["state"][n] = self._new_state(n, g["params"], group)

    # ---- pickle and copy.deepcopy ------------------------------------------
    # The pointer tables (TensorTable, ParamIndex) hold raw addresses; they
    # travel as their arrays and are rebuilt over the copies, which pickle's
    # memo keeps the same objects as those in param_groups. The state arrays
    # arrive as separate copies and are carved out of one buffer again.
    def __getstate__(self):
        state = state_without_lock(self)
        del state["_index"]
        state["_groups"] = [dict(g, params=g["params"].arrays,
                                 state={n: t.arrays for n, t in g["state"].items()})
                            for g in self._groups]
        return state

    def __setstate__(self, state):
        groups = state.pop("_groups")
        self.__dict__.update(state)
        self._groups = []
        for g in groups:
            table = _fastopt.TensorTable(g["params"], "params")
            self._groups.append(dict(g, params=table, state={
                n: _fastopt.TensorTable(_state_arrays(table.arrays, data=arrays), n, table)
                for n, arrays in g["state"].items()}))
        self._index = _fastopt.ParamIndex([g["params"] for g in self._groups])

    def __repr__(self):
        lines = [type(self).__name__ + " ("]
        for i, g in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines += [f"    {k}: {v}" for k, v in sorted(g.items()) if k != "params"]
        return "\n".join(lines + [")"])

    @staticmethod
    def _common_checks(group):
        _check_scalar(group, "lr", 0)
        _check_scalar(group, "weight_decay", 0)
        _check_scalar(group, "l1", 0)
        _check_flag(group, "maximize")


def _state(g, name):
    return g["state"].get(name)


class SGD(Optimizer):
    """p -= lr*g with momentum b = momentum*b + (1-dampening)*g (first step b = g)
    and optional Nesterov g + momentum*b."""

    defaults = dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                    nesterov=False, maximize=False, l1=0.0)

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False, l1=0.0):
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov,
                         maximize=maximize, l1=l1)

    def _validate(self, group):
        self._common_checks(group)
        m = _check_scalar(group, "momentum", 0)
        d = _check_scalar(group, "dampening", 0, 1)
        _check_flag(group, "nesterov")
        if group["nesterov"] and (m <= 0 or d != 0):
            raise ValueError("nesterov requires momentum > 0 and dampening = 0")

    def _state_names(self, group):
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _update(self, g, grads, group, fresh):
        _fastopt.sgd_step(  # positional: keyword parsing costs ~1 us per call
            g["params"], grads, _state(g, "momentum_buffer"), group["lr"],
            group["momentum"], group["dampening"], group["weight_decay"], group["l1"],
            group["nesterov"], group["maximize"], "momentum_buffer" in fresh)


class Adagrad(Optimizer):
    """s += g*g; p -= lr/(1+(step-1)*lr_decay) * g/(sqrt(s)+eps)."""

    defaults = dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
                    eps=1e-10, maximize=False, l1=0.0)

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                 initial_accumulator_value=0.0, eps=1e-10, *, maximize=False, l1=0.0):
        super().__init__(params, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                         initial_accumulator_value=initial_accumulator_value, eps=eps,
                         maximize=maximize, l1=l1)

    def _validate(self, group):
        self._common_checks(group)
        _check_scalar(group, "lr_decay", 0)
        _check_scalar(group, "initial_accumulator_value", 0)
        _check_scalar(group, "eps", 0, lo_open=True)

    def _state_names(self, group):
        return ("sum",)

    _eager_state_names = _state_names

    def _state_fill(self, name, group):
        return group["initial_accumulator_value"]

    def _update(self, g, grads, group, fresh):
        _fastopt.adagrad_step(
            g["params"], grads, g["state"]["sum"], group["lr"], group["lr_decay"],
            group["weight_decay"], group["eps"], group["l1"], group["maximize"], g["step"])


class RMSprop(Optimizer):
    """s = alpha*s + (1-alpha)*g*g; p -= lr*g/(sqrt(s)+eps), optionally centered,
    with momentum and (fastopt's) Nesterov momentum."""

    defaults = dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                    centered=False, nesterov=False, maximize=False, l1=0.0)

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0,
                 momentum=0.0, centered=False, *, nesterov=False, maximize=False, l1=0.0):
        super().__init__(params, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                         momentum=momentum, centered=centered, nesterov=nesterov,
                         maximize=maximize, l1=l1)

    def _validate(self, group):
        self._common_checks(group)
        _check_scalar(group, "alpha", 0, 1)
        _check_scalar(group, "eps", 0, lo_open=True)
        m = _check_scalar(group, "momentum", 0)
        _check_flag(group, "centered")
        _check_flag(group, "nesterov")
        if group["nesterov"] and m <= 0:
            raise ValueError("nesterov requires momentum > 0")

    def _state_names(self, group):
        names = ["square_avg"]
        if group["momentum"] > 0:
            names.append("momentum_buffer")
        if group["centered"]:
            names.append("grad_avg")
        return tuple(names)

    def _update(self, g, grads, group, fresh):
        _fastopt.rmsprop_step(
            g["params"], grads, g["state"]["square_avg"], _state(g, "grad_avg"),
            _state(g, "momentum_buffer"), group["lr"], group["alpha"], group["eps"],
            group["weight_decay"], group["momentum"], group["l1"], group["centered"],
            group["nesterov"], group["maximize"])


class Adam(Optimizer):
    """m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g*g;
    p -= lr/(1-b1^t) * m/(sqrt(v)/sqrt(1-b2^t) + eps) (amsgrad: running max of v).

    weight_decay=None means the class default: 0 for Adam, 1e-2 for AdamW."""

    defaults = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                    amsgrad=False, maximize=False, l1=0.0)
    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=None,
                 amsgrad=False, *, maximize=False, l1=0.0):
        if weight_decay is None:
            weight_decay = type(self).defaults["weight_decay"]
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, l1=l1)

    def _validate(self, group):
        self._common_checks(group)
        _check_scalar(group, "eps", 0, lo_open=True)
        try:
            b1, b2 = group["betas"]
        except (TypeError, ValueError):
            raise TypeError("betas must be a pair (beta1, beta2)") from None
        _check_scalar({"betas[0]": b1}, "betas[0]", 0, 1, hi_open=True)
        _check_scalar({"betas[1]": b2}, "betas[1]", 0, 1, hi_open=True)
        group["betas"] = (float(b1), float(b2))   # a tuple: not edited behind our back
        _check_flag(group, "amsgrad")

    def _state_names(self, group):
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())

    def _update(self, g, grads, group, fresh):
        b1, b2 = group["betas"]
        _fastopt.adam_step(
            g["params"], grads, g["state"]["exp_avg"], g["state"]["exp_avg_sq"],
            _state(g, "max_exp_avg_sq"), group["lr"], b1, b2, group["eps"],
            group["weight_decay"], group["l1"], group["amsgrad"], group["maximize"],
            self._decoupled, g["step"])


class AdamW(Adam):
    """Adam with decoupled weight decay: first p *= 1 - lr*weight_decay
    (and p -= lr*l1*sign(p)), then the Adam step on the raw gradient."""

    defaults = dict(Adam.defaults, weight_decay=1e-2)
    _decoupled = True
