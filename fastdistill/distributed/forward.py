"""run_in_forward: run a function inside a wrapped module's forward ("forward redirection").

Wrappers such as DistributedDataParallel and FSDP2 (`torch.distributed.fsdp.fully_shard`) do their work
in the hooks of `module.__call__`: DDP prepares its gradient reducer in its forward; FSDP2 all-gathers
the parameters before the forward, frees them after it (reshard_after_forward) and hooks the forward's
inputs and outputs so that backward all-gathers again and reduce-scatters the gradients. A loss that
reads a parameter (an output head's weight) outside the forward would see a sharded DTensor, or a
gradient FSDP never reduces. run_in_forward calls `fn` as the module's forward for one call, so all of
that happens around it (the technique TRL and Lightning call forward redirection).
"""
from __future__ import annotations

import contextvars
from typing import Any, Callable

import torch
from torch import nn

# Modules whose forward is running fn right now (by id): code inside fn calls their `forward`
# directly instead of `__call__`, which would run the wrapper's hooks a second time.
_ACTIVE: contextvars.ContextVar[frozenset] = contextvars.ContextVar("fastdistill_in_forward", default=frozenset())


def _is_ddp(module: nn.Module) -> bool:
    return isinstance(module, torch.nn.parallel.DistributedDataParallel)


def is_fsdp(module: nn.Module) -> bool:
    """True for a module given to torch.distributed.fsdp.fully_shard (FSDP2)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return False
    return isinstance(module, FSDPModule)


def unwrap(module: nn.Module) -> nn.Module:
    """The module a DDP wrapper holds; any other module itself (FSDP2 modules are their own model)."""
    while _is_ddp(module):
        module = module.module
    return module


def needs_redirection(module: nn.Module) -> bool:
    return _is_ddp(module) or is_fsdp(module)


def in_forward(module: nn.Module) -> bool:
    """Whether `module`'s forward (or its wrapper's) is running a run_in_forward function now."""
    return id(module) in _ACTIVE.get()


def run_in_forward(module: nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs), run as the forward of `module` when `module` is a DDP or FSDP2 module.

    For DDP the forward of `module.module` is replaced for one call of `module(...)`, so DDP's own
    forward logic runs; for an FSDP2 module its own forward is replaced, so its pre-forward hook
    all-gathers the parameters, fn sees them unsharded, and tensors that fn returns get the hooks that
    all-gather again in backward and reduce-scatter the gradients. Tensors that need gradients and come
    from outside (hidden states) must be passed in args/kwargs, not captured by fn: FSDP registers its
    post-backward hook on the forward's inputs. Inside fn, `in_forward(module)` is True, and fn calls the
    real forward as `module.forward(...)` (the original is back in place while fn runs). For any other
    module fn is simply called.
    """
    if not needs_redirection(module):
        return fn(*args, **kwargs)
    inner = unwrap(module)
    own = "forward" in inner.__dict__  # an instance-level forward (accelerate, PEFT) to put back as it was
    saved = inner.__dict__.get("forward")

    def restore() -> None:
        if own:
            inner.forward = saved
        else:
            inner.__dict__.pop("forward", None)

    def redirected(*a: Any, **kw: Any) -> Any:
        restore()  # fn may call the real forward
        token = _ACTIVE.set(_ACTIVE.get() | {id(module), id(inner)})
        try:
            return fn(*a, **kw)
        finally:
            _ACTIVE.reset(token)

    inner.forward = redirected
    try:
        return module(*args, **kwargs)
    finally:
        restore()  # also when a pre-forward hook raised before `redirected` ran
