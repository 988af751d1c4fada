"""Graph passes the compile engine hands to Inductor (:class:`pvae.inference.step.SVIStep`,
``engine="compile"``), through its supported hook for custom passes (``torch._inductor.config``'s
``post_grad_custom_pre_pass``, a ``CustomGraphPass`` whose ``uuid`` keys Inductor's caches).

:class:`Log1pViaLog`: ``log1p`` of float32/float64 CPU tensors computed from ``log``
(:func:`log1p_via_log`). On CPU, torch's vector ``log1p`` (SLEEF's ``log1pf``, also what Inductor emits
for it) costs several times a ``log`` per element, and a Bernoulli likelihood's log-density — binary
cross-entropy with logits, log1p(exp(−|l|)) per pixel — is the largest element-wise kernel of a VAE step
(``benchmarks/vae_vs_torch.py``). The formula is within a few ulp of log1p (tested), as exact as the
kernels it replaces for a loss summed in float32.

:class:`OneDnnGemms`: the large fp32 matrix products (``aten.mm``, ``aten.addmm`` with a bias row) through
oneDNN's linear kernel (``torch.ops.mkldnn._linear_pointwise``) instead of torch's default BLAS (MKL's
``sgemm``), where :func:`onednn_wins` says it is faster. Both are exact fp32 products (no reduced
precision); they differ in rounding only. The rule is measured (``benchmarks/gemm.py``): on CPUs with
AVX-512 oneDNN ran the VAE's 784↔400 layers forward and backward faster than MKL and its small layers
(a side under 128) slower; on an AVX2-only CPU MKL won on every shape. Inductor lowers oneDNN's op only
with constant (frozen) weights, so the pass calls it through a small operator of its own,
``pvae::onednn_linear``, which Inductor runs as an external kernel.
"""

from __future__ import annotations

import functools
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


_DTYPES = (torch.float32, torch.float64)


def _rewrites(value) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.dtype in _DTYPES


def _emit(graph: torch.fx.Graph, op, *args) -> torch.fx.Node:
    """A node calling ``op(*args)`` at the graph's insertion point, with the fake value Inductor's passes
    expect (``op`` run on the arguments' fake values)."""
    fake = [arg.meta["val"] if isinstance(arg, torch.fx.Node) else arg for arg in args]
    node = graph.call_function(op, args)
    node.meta["val"] = op(*fake)
    return node


@functools.cache
def _digest(extra: str = "") -> str:
    """This module's code (and ``extra``) hashed: the passes' ``uuid``, so a change to them compiles
    afresh instead of reusing Inductor's cached graphs."""
    return hashlib.sha256((inspect.getsource(sys.modules[__name__]) + extra).encode()).hexdigest()


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
                with graph.inserting_before(node):
                    result = _log1p_steps(node.args[0], functools.partial(_emit, graph))
                node.replace_all_uses_with(result)
                graph.erase_node(node)

        def uuid(self) -> str:
            return _digest()

else:
    Log1pViaLog = None


#: the smallest inner and outer size of a product :class:`OneDnnGemms` hands to oneDNN
ONEDNN_MIN_SIZE = 128

_LINEAR = (
    getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
)
_LIBRARY = None


def onednn_available() -> bool:
    """Whether this torch has oneDNN's linear kernel (and so :class:`OneDnnGemms` can run)."""
    return _LINEAR is not None and CustomGraphPass is not None


def onednn_wins(rows: int, inner: int, outer: int) -> bool:
    """The rule :class:`OneDnnGemms` follows: oneDNN for a (rows × inner)·(inner × outer) fp32 product
    when the CPU runs torch's AVX-512 kernels and both ``inner`` and ``outer`` are at least
    :data:`ONEDNN_MIN_SIZE`, whatever ``rows`` (see the module docstring for the measurements behind it)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return capability.startswith("AVX512") and min(inner, outer) >= ONEDNN_MIN_SIZE


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _LINEAR.default(x, weight, bias, "none", [], "")


def _define_operator() -> None:
    """``pvae::onednn_linear(x, weight, bias)`` = x·weightᵀ + bias through oneDNN, defined once per process
    (a plain CPU kernel: ``torch.library.custom_op``'s wrapper cost more per call than it saved)."""
    global _LIBRARY
    if _LIBRARY is not None or hasattr(torch.ops.pvae, "onednn_linear"):
        return
    library = torch.library.Library("pvae", "FRAGMENT")
    library.define("onednn_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
    library.impl("onednn_linear", lambda x, weight, bias: _onednn_linear(x, weight, bias), "CPU")
    torch.library.register_fake("pvae::onednn_linear", lib=library)(
        lambda x, weight, bias: x.new_empty(x.shape[0], weight.shape[0])
    )
    _LIBRARY = library


if CustomGraphPass is not None:

    class OneDnnGemms(CustomGraphPass):
        """Inductor post-grad pass: each fp32 CPU ``aten.mm(a, b)`` and ``aten.addmm(bias, a, b)`` (a bias
        row, no scaling) that :func:`onednn_wins` picks becomes ``pvae::onednn_linear(a, bᵀ, bias)``."""

        def __call__(self, graph: torch.fx.Graph) -> None:
            _define_operator()
            for node in list(graph.nodes):
                if node.op != "call_function" or node.kwargs:
                    continue
                if node.target is aten.mm.default:
                    (a, b), bias = node.args, None
                elif node.target is aten.addmm.default:
                    bias, a, b = node.args
                else:
                    continue
                values = [
                    arg.meta.get("val") if isinstance(arg, torch.fx.Node) else arg for arg in (a, b, bias)
                ]
                if not all(isinstance(value, torch.Tensor) for value in values[:2]):
                    continue
                if not all(
                    value.device.type == "cpu" and value.dtype == torch.float32
                    for value in values
                    if value is not None
                ):
                    continue
                if values[2] is not None and values[2].dim() != 1:
                    continue
                (rows, inner), outer = values[0].shape, values[1].shape[1]
                if not onednn_wins(rows, inner, outer):
                    continue
                with graph.inserting_before(node):
                    weight = _emit(graph, aten.permute.default, b, [1, 0])
                    product = _emit(graph, torch.ops.pvae.onednn_linear.default, a, weight, bias)
                node.replace_all_uses_with(product)
                graph.erase_node(node)

        def uuid(self) -> str:
            return _digest(torch.backends.cpu.get_cpu_capability())  # the CPU's kernels: the rule reads them

else:
    OneDnnGemms = None

#: the values of ``compile_options["gemm"]``: ``"auto"`` (:class:`OneDnnGemms` where its rule picks
#: oneDNN) or ``"default"`` (torch's default BLAS for every product)
GEMM_CHOICES = ("auto", "default")


def with_passes(patches: dict, gemm: str = "auto") -> dict:
    """Inductor settings ``patches`` with :class:`Log1pViaLog` (and, for ``gemm="auto"`` where oneDNN is
    available, :class:`OneDnnGemms`) first among the post-grad passes, before any the caller set there;
    unchanged where this torch has no custom-pass hook."""
    if gemm not in GEMM_CHOICES:
        raise ValueError(f"compile_options: gemm must be one of {GEMM_CHOICES}, got {gemm!r}")
    if Log1pViaLog is None:
        return patches
    ours = [Log1pViaLog()]
    if gemm == "auto" and onednn_available():
        _define_operator()  # now: a graph from Inductor's cache calls it without the pass having run
        ours.append(OneDnnGemms())
    theirs = patches.get("post_grad_custom_pre_pass")
    theirs = [] if theirs is None else list(theirs) if isinstance(theirs, list | tuple) else [theirs]
    return patches | {"post_grad_custom_pre_pass": [*ours, *theirs]}
