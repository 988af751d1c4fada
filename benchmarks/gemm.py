"""Benchmark: fp32 GEMM GFLOP/s on this CPU, per route torch offers, for the VAE's linear layers.

Routes (all fp32 in, fp32 out; none lowers the precision):

``default``
    what ``nn.Linear`` runs: ``F.linear`` forward (``aten::addmm``) and autograd's backward
    (``aten::mm`` twice and a sum), i.e. ``cpublas::gemm`` → MKL's ``sgemm`` on x86.
``onednn``
    the three products of a linear layer through torch's oneDNN linear op on ordinary dense tensors,
    ``torch.ops.mkldnn._linear_pointwise(X, W, b, "none", [], "")`` (Y = X Wᵀ + b); the backward products
    pass transposed *views* (dX = G·W as ``_linear_pointwise(G, Wᵀ)``, dW = Gᵀ·X as
    ``_linear_pointwise(Gᵀ, Xᵀ)``), so no layout copies are made.
``onednn-prepacked``
    as ``onednn``, the forward product with a weight reordered into oneDNN's blocked layout first
    (``torch.ops.mkldnn._reorder_linear_weight(W, batch)``, done on every step, as training changes W).
``mkldnn-tensors``
    oneDNN's own tensor layout: ``x.to_mkldnn()``, ``torch._C._nn.mkldnn_linear``,
    ``aten::mkldnn_linear_backward_input``/``_weights``, and ``to_dense()`` back (conversions timed).
``compile-max-autotune`` (with ``--compile``)
    ``torch.compile(mode="max-autotune-no-cudagraphs")`` of the forward+backward function. Inductor's C++
    GEMM template only takes a *constant* weight (``use_cpp_gemm_template(..., require_constant_mat2=True)``:
    frozen parameters, inference with ``torch._inductor.config.freezing``), so in training its autotuner
    has only ATen's GEMM to choose: this row measures Inductor's wrapper around MKL.

Not timed, because they do not apply to exact fp32 training on an x86 CPU:
``torch.backends.mkldnn.matmul.fp32_precision = "bf16"/"tf32"`` and
``torch.set_float32_matmul_precision("medium"/"high")`` lower the precision (bf16 needs AVX-512 BF16 or
AMX: on an AVX2 CPU ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is False, and with either setting
``MKL_VERBOSE=1``/``ONEDNN_VERBOSE=1`` still show MKL's SGEMM and oneDNN without an fpmath mode);
``TORCH_MKLDNN_MATMUL_MIN_DIM``/``_MIN_SIZE`` steer ``addmm`` to oneDNN only on AArch64 builds with ACL
(on x86, fp32 ``addmm`` calls ``cpublas::gemm``, i.e. MKL, unless a reduced precision above is set and
supported); ``torch.utils.mkldnn.to_mkldnn(module)`` swaps ``nn.Linear`` for an inference-only
``MkldnnLinear`` around ``torch._C._nn.mkldnn_linear`` (its op is timed in the ``mkldnn-tensors`` row,
with its backward ops).
"""

import argparse
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

LAYERS = [  # (batch, in, out): the 784-400-{20,50} VAE's encoder and decoder layers
    (32, 784, 400),
    (32, 400, 100),
    (32, 50, 400),
    (32, 400, 784),
    (128, 784, 400),
    (128, 400, 40),
    (128, 400, 100),
    (128, 20, 400),
    (128, 50, 400),
    (128, 400, 784),
    (2048, 2048, 2048),
]


def linear_pointwise(x, weight, bias=None):
    """oneDNN's linear, Y = X Wᵀ (+ b), on dense fp32 tensors (strided views allowed)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


# ---- whole layers: forward + backward --------------------------------------------------------------------
def default_layer(x, weight, bias, grad):
    y = F.linear(x, weight, bias)
    return (y, *torch.autograd.grad(y, (x, weight, bias), grad))


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, prepack):
        ctx.save_for_backward(x, weight)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, x.shape[0]) if prepack else weight
        return linear_pointwise(x, packed, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = linear_pointwise(grad, weight.t())  # (B, in) = G W
        grad_weight = linear_pointwise(grad.t(), x.t())  # (out, in) = Gᵀ X
        return grad_x, grad_weight, grad.sum(0), None


def onednn_layer(x, weight, bias, grad, prepack=False):
    y = _OneDNNLinear.apply(x, weight, bias, prepack)
    return (y, *torch.autograd.grad(y, (x, weight, bias), grad))


def prepacked_layer(x, weight, bias, grad):
    return onednn_layer(x, weight, bias, grad, prepack=True)


def mkldnn_tensor_layer(x, weight, bias, grad):
    x_m, w_m, g_m = x.detach().to_mkldnn(), weight.detach().to_mkldnn(), grad.to_mkldnn()
    # (mkldnn_linear_backward_input takes the weight dense, grad_output in oneDNN's layout)
    y = torch._C._nn.mkldnn_linear(x_m, w_m, bias.detach().to_mkldnn()).to_dense()
    grad_x = torch.ops.aten.mkldnn_linear_backward_input(list(x.shape), g_m, weight.detach()).to_dense()
    grad_w, grad_b = torch.ops.aten.mkldnn_linear_backward_weights(g_m, x_m, w_m, True)
    return y, grad_x, grad_w, grad_b


def compiled_layer():
    return torch.compile(default_layer, mode="max-autotune-no-cudagraphs", dynamic=False)


# ---- measuring -------------------------------------------------------------------------------------------
def time_call(function, seconds):
    """Seconds per call (median of 3 runs of a block sized to last about ``seconds``)."""
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < seconds / 4 or calls < 2:
        function()
        calls += 1
    per_call = (time.perf_counter() - start) / calls
    repeat = max(1, int(seconds / 3 / per_call))
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeat):
            function()
        samples.append((time.perf_counter() - start) / repeat)
    return statistics.median(samples)


def interleaved(functions: dict, rounds: int, seconds: float) -> dict:
    """{name: [seconds per call, one per round]}, the functions run in a rotated order each round."""
    names = list(functions)
    for name in names:  # warm-up (oneDNN builds its primitives on the first call for a shape)
        functions[name]()
    times = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(time_call(functions[name], seconds))
    return times


def summarize(times: dict, flop: float, baseline: str) -> dict:
    """{name: (median GFLOP/s, median of per-round ratios t_baseline / t_name)}."""
    return {
        name: (
            flop / statistics.median(values) / 1e9,
            statistics.median(b / v for b, v in zip(times[baseline], values)),
        )
        for name, values in times.items()
    }


def relative_error(outputs, reference) -> float:
    return max(
        ((out.double() - ref).abs().max() / ref.abs().max()).item() for out, ref in zip(outputs, reference)
    )


def layer_inputs(batch, width_in, width_out, generator):
    x = torch.randn(batch, width_in, generator=generator).requires_grad_()
    weight = (torch.randn(width_out, width_in, generator=generator) / width_in**0.5).requires_grad_()
    bias = torch.randn(width_out, generator=generator).requires_grad_()
    grad = torch.randn(batch, width_out, generator=generator)
    return x, weight, bias, grad


def product_table(args, threads, generator):
    print(f"\n### Single products, {threads} thread(s): GFLOP/s (× MKL's time)\n")
    print("| product | shape (m × k × n) | MKL `mm`/`addmm` | oneDNN `_linear_pointwise` |")
    print("| --- | --- | ---: | ---: |")
    for batch, width_in, width_out in args.layers:
        x, weight, bias, grad = (t.detach() for t in layer_inputs(batch, width_in, width_out, generator))
        products = {
            "forward Y = X Wᵀ + b": (
                (batch, width_in, width_out),
                partial(torch.addmm, bias, x, weight.t()),
                partial(linear_pointwise, x, weight, bias),
            ),
            "backward dX = G W": (
                (batch, width_out, width_in),
                partial(torch.mm, grad, weight),
                partial(linear_pointwise, grad, weight.t()),
            ),
            "backward dW = Gᵀ X": (
                (width_out, batch, width_in),
                partial(torch.mm, grad.t(), x),
                partial(linear_pointwise, grad.t(), x.t()),
            ),
        }
        for label, (shape, mkl, onednn) in products.items():
            if batch == 2048 and label != "forward Y = X Wᵀ + b":
                continue
            times = interleaved({"mkl": mkl, "onednn": onednn}, args.rounds, args.seconds)
            summary = summarize(times, 2 * shape[0] * shape[1] * shape[2], "mkl")
            shape_text = " × ".join(str(size) for size in shape)
            print(
                f"| {label} | {shape_text} | {summary['mkl'][0]:.0f} | "
                f"{summary['onednn'][0]:.0f} ({summary['onednn'][1]:.2f}×) |"
            )


def layer_table(args, threads, generator):
    routes = {
        "default": default_layer,
        "onednn": onednn_layer,
        "onednn-prepacked": prepacked_layer,
        "mkldnn-tensors": mkldnn_tensor_layer,
    }
    if args.compile:
        routes["compile-max-autotune"] = compiled_layer()
    print(f"\n### Linear layer forward + backward, {threads} thread(s): GFLOP/s (× default's speed)\n")
    print("| batch × in × out | " + " | ".join(routes) + " | max rel. error: default / worst other |")
    print("| --- |" + " ---: |" * (len(routes) + 1))
    for batch, width_in, width_out in args.layers:
        tensors = layer_inputs(batch, width_in, width_out, generator)
        reference = default_layer(
            *(t.detach().double().requires_grad_() for t in tensors[:3]), tensors[3].double()
        )
        errors = {name: relative_error(route(*tensors), reference) for name, route in routes.items()}
        times = interleaved(
            {name: partial(route, *tensors) for name, route in routes.items()}, args.rounds, args.seconds
        )
        summary = summarize(times, 6 * batch * width_in * width_out, "default")
        cells = [f"{summary['default'][0]:.0f}"] + [
            f"{summary[name][0]:.0f} ({summary[name][1]:.2f}×)" for name in list(routes)[1:]
        ]
        worst = max(error for name, error in errors.items() if name != "default")
        print(
            f"| {batch} × {width_in} × {width_out} | "
            + " | ".join(cells)
            + f" | {errors['default']:.1e} / {worst:.1e} |"
        )


def layer_shape(text: str) -> tuple[int, int, int]:
    """``"128x784x400"`` → (128, 784, 400)."""
    sizes = tuple(int(size) for size in text.lower().replace("×", "x").split("x"))
    if len(sizes) != 3 or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"expected batch×in×out, e.g. 128x784x400, got {text!r}")
    return sizes


def main(args):
    print(
        f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, oneDNN available: "
        f"{torch.backends.mkldnn.is_available()}, rounds = {args.rounds}, "
        f"≈{args.seconds} s per cell and round"
    )
    generator = torch.Generator().manual_seed(0)
    for threads in args.threads:
        torch.set_num_threads(threads)
        product_table(args, threads, generator)
        layer_table(args, threads, generator)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--layers",
        type=layer_shape,
        nargs="+",
        default=LAYERS,
        help="batch×in×out shapes to time, e.g. 128x784x400 (default: the VAE's layers and 2048³)",
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seconds", type=float, default=0.05)
    parser.add_argument(
        "--compile", action="store_true", help="add torch.compile(max-autotune) (slow to build)"
    )
    main(parser.parse_args())
