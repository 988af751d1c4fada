"""Graph passes the compile engine hands to Inductor (:class:`pvae.inference.step.SVIStep`,
``engine="compile"``), through its supported hook for custom passes (``torch._inductor.config``'s
``post_grad_custom_pre_pass``, a ``CustomGraphPass`` whose ``uuid`` keys Inductor's caches).

:class:`Log1pViaLog`: ``log1p`` of float32/float64 CPU tensors computed from ``log``
(:func:`log1p_via_log`). On CPU, torch's vector ``log1p`` (SLEEF's ``log1pf``, also what Inductor emits
for it) costs several times a ``log`` per element, and a Bernoulli likelihood's log-density — binary
cross-entropy with logits, log1p(exp(−|l|)) per pixel — is the largest element-wise kernel of a VAE step
(``benchmarks/vae_vs_torch.py``). The formula is within a few ulp of log1p (tested), as exact as the
kernels it replaces for a loss summed in float32.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import sys
from collections.abc import Callable

import torch

aten = torch.ops.aten


def _log1p_steps(x, call: Callable):
    """log1p(x) = log(u)·x/(u − 1) with u = 1 + x, and x itself where u rounds to 1 or is +inf: the
    rounding error of 1 + x cancels between log(u) and u − 1 (Goldberg, "What every computer scientist
    should know about floating-point arithmetic", 1991, Theorem 4). Written once as aten calls, run by
    ``call(op, *args)``: on tensors (:func:`log1p_via_log`) or as graph nodes (:class:`Log1pViaLog`)."""
    u = call(aten.add.Tensor, x, 1)
    use_x = call(aten.bitwise_or.Tensor, call(aten.eq.Scalar, u, 1), call(aten.eq.Scalar, u, math.inf))
    ratio = call(aten.div.Tensor, x, call(aten.sub.Tensor, u, 1))
    return call(aten.where.self, use_x, x, call(aten.mul.Tensor, call(aten.log.default, u), ratio))


def _rewrites(value) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.dtype in _DTYPES


_DTYPES = (torch.float32, torch.float64)


def log1p_via_log(x: torch.Tensor) -> torch.Tensor:
    """``log1p(x)`` from ``log`` (see :func:`_log1p_steps`): within a few ulp of ``torch.log1p`` for every
    float32/float64 x, with its values at 0, −0, −1, +inf, below −1 and NaN."""
    if not _rewrites(x):
        raise ValueError(f"log1p_via_log takes float32/float64 CPU tensors, got {x.dtype} on {x.device}")
    return _log1p_steps(x, lambda op, *args: op(*args))


try:
    from torch._inductor.custom_graph_pass import CustomGraphPass
except ImportError:  # a torch without Inductor's custom-pass hook: the compile engine runs without the pass
    CustomGraphPass = None

if CustomGraphPass is not None:

    class Log1pViaLog(CustomGraphPass):
        """Inductor post-grad pass: each ``aten.log1p`` node of a float32/float64 CPU tensor becomes the
        nodes of :func:`_log1p_steps` (their fake values computed as Inductor's passes expect)."""

        def __call__(self, graph: torch.fx.Graph) -> None:
            for node in list(graph.nodes):
                if node.op != "call_function" or node.target is not aten.log1p.default:
                    continue
                if not _rewrites(node.meta.get("val")):
                    continue

                def emit(op, *args):
                    fake = [arg.meta["val"] if isinstance(arg, torch.fx.Node) else arg for arg in args]
                    new = graph.call_function(op, args)
                    new.meta["val"] = op(*fake)
                    return new

                with graph.inserting_before(node):
                    result = _log1p_steps(node.args[0], emit)
                node.replace_all_uses_with(result)
                graph.erase_node(node)

        def uuid(self) -> str:
            """Keys Inductor's caches on this module's code: a change to the pass compiles afresh."""
            return hashlib.sha256(inspect.getsource(sys.modules[__name__]).encode()).hexdigest()

else:
    Log1pViaLog = None


def with_passes(patches: dict) -> dict:
    """Inductor settings ``patches`` with :class:`Log1pViaLog` first among the post-grad passes (before any
    the caller set there); unchanged where this torch has no custom-pass hook."""
    if Log1pViaLog is None:
        return patches
    theirs = patches.get("post_grad_custom_pre_pass")
    theirs = [] if theirs is None else list(theirs) if isinstance(theirs, list | tuple) else [theirs]
    return patches | {"post_grad_custom_pre_pass": [Log1pViaLog(), *theirs]}
