"""Building on the meta device without initialising it: a meta tensor holds no values, so its
initialisation is skipped, in ``torch.nn.init`` and in value-only in-place ops."""
from __future__ import annotations

import contextlib
import threading

import torch


# In-place ops that only write values (never a shape or stride): on a meta tensor, which holds
# no values, they have nothing to do.  torch still runs their meta implementations -- for the
# random ones (normal_, uniform_: every weight init) a Python decomposition costing ~1 ms per
# call -- so a build on the meta device spent most of its time initialising nothing.
_VALUE_ONLY_INPLACE = frozenset({
    "normal_", "uniform_", "bernoulli_", "exponential_", "geometric_", "log_normal_", "cauchy_", "random_",
    "erfinv_", "fill_", "zero_", "copy_", "add_", "sub_", "mul_", "div_", "neg_", "sqrt_", "abs_",
    "clamp_", "clamp_min_", "clamp_max_", "fmod_", "remainder_", "pow_", "exp_", "log_", "tanh_",
})


_INIT_PATCH = {"depth": 0, "saved": {}}
_INIT_LOCK = threading.Lock()


def _meta_passthrough(init):
    def skip_meta(tensor, *args, **kwargs):
        return tensor if isinstance(tensor, torch.Tensor) and tensor.is_meta else init(tensor, *args, **kwargs)
    skip_meta.__wrapped__ = init
    return skip_meta


@contextlib.contextmanager
def _skip_meta_init_functions():
    """While building: ``torch.nn.init``'s in-place initialisers return a meta tensor untouched
    (they compute fans by indexing it first, ~1 ms per layer on meta).  Real tensors, in any
    thread, are initialised exactly as before: the wrapper passes them through."""
    import torch.nn.init as init
    with _INIT_LOCK:
        if _INIT_PATCH["depth"] == 0:
            for name in dir(init):
                fn = getattr(init, name)
                if name.endswith("_") and not name.startswith("_") and callable(fn):
                    _INIT_PATCH["saved"][name] = fn
                    setattr(init, name, _meta_passthrough(fn))
        _INIT_PATCH["depth"] += 1
    try:
        yield
    finally:
        with _INIT_LOCK:
            _INIT_PATCH["depth"] -= 1
            if _INIT_PATCH["depth"] == 0:
                for name, fn in _INIT_PATCH["saved"].items():
                    setattr(init, name, fn)
                _INIT_PATCH["saved"].clear()


class _SkipMetaInit(torch.overrides.TorchFunctionMode):
    """(torch function mode, thread-local) Return a meta tensor's value-only in-place ops at once."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if args and getattr(func, "__name__", None) in _VALUE_ONLY_INPLACE:
            target = args[0]
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def skip_meta_init():
    """Both skips, for the duration of a build (real tensors are initialised as ever)."""
    with _skip_meta_init_functions(), _SkipMetaInit():
        yield
