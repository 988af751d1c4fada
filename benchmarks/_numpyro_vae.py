"""NumPyro's SVI on pvae's VAE network: the child process of ``benchmarks/vae_vs_torch.py --numpyro``.

It imports neither torch nor pvae, so it runs under any Python that has jax, jaxlib, numpyro and numpy
(``--numpyro-python`` of the parent). The network is pvae's ``VAE(architecture="mlp")`` written in stax,
the way NumPyro's users declare networks (``numpyro.module``):

- guide: encoder Dense(hidden) → leaky_relu(slope 0.2) → Dense(2·z) giving μ and log σ²,
  z ~ Normal(μ, exp(½ log σ²)) in the ``"data"`` plate;
- model: z ~ Normal(0, I), decoder Dense(hidden) → relu → Dense(784) giving Bernoulli logits for x;
- ``numpyro.infer.SVI`` with ``Trace_ELBO()`` (Monte-Carlo KL, as pvae's default objective) and
  ``numpyro.optim.Adam(1e-3)``, from the parent's initial weights (torch's (out, in) matrices transposed
  into stax's (in, out)).

Two training loops, each with its own SVI state and random key, over the grey-level batches the parent
wrote (the digits of the torch loops' batches, in the same order). Each batch is binarized inside the
jitted function, ``jax.random.bernoulli`` on a key split off the loop's key, as NumPyro's own VAE example
does, so NumPyro pays for its binary draws as the torch loops pay for theirs:

``step``
    ``update = jax.jit(step)``, where ``step`` binarizes the batch and calls ``svi.update``, called once
    per batch on the NumPy array of that batch (so each call converts it to a device array, as a user's
    loop does), ``block_until_ready`` at the end of the epoch;
``fori``
    the whole epoch as one jitted ``jax.lax.fori_loop`` of the same body over the epoch's batches,
    already on the device as one (batches, batch size, 784) array.

Protocol: one JSON request per line on stdin, one JSON reply per line on stdout (the process's own stdout
is redirected to stderr, so nothing printed by a library can mix with the replies):

- ``{"op": "versions"}`` → jax, jaxlib and numpyro versions, XLA's devices and its threads;
- ``{"op": "load", "path": P, "key": K}`` → reads ``P`` (``.npz``: ``batches``, uint8 of shape (epochs,
  batches, batch size, 784), grey levels 0…255, and the initial weights under torch's state-dict names),
  builds the SVI and both states from ``jax.random.PRNGKey(K)``; replies with the shape;
- ``{"op": "reset"}`` → both loops back to the initial weights and the same random key (compiled functions
  are kept);
- ``{"op": "epoch", "loop": "step" | "fori", "index": e}`` → trains that loop one epoch on epoch ``e``'s
  batches; replies ``{"seconds": …, "elbo": …}`` (the wall time of the epoch; the train ELBO per image
  of that epoch, −Σ losses / images, computed after the clock stops);
- ``{"op": "gemm", "kind": "linear" | "matmul", "shape": [m, k, n], "seconds": s}`` → seconds per call of
  a jitted fp32 product: ``linear`` is a linear layer's forward and backward (Y = X Wᵀ + b, then dX, dW and
  db by ``jax.vjp``) with X (m, k), W (n, k); ``matmul`` is Y = X Wᵀ alone. Each call is waited for.

Run by the parent as ``python _numpyro_vae.py [--threads N]``, N the number of torch's threads: XLA then
uses as many (see :func:`limit_threads`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def limit_threads(threads: int) -> int:
    """Make XLA use ``threads`` threads (before jax starts); the number it will use.

    One thread: XLA's Eigen thread pool off (``--xla_cpu_multi_thread_eigen=false``), the process free to
    run on any CPU, like torch's one thread. More, but fewer than the CPUs available: the process bound to
    that many of them, since XLA sizes its pools by the CPUs it may run on."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if threads == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false").strip()
        return 1
    if 1 < threads < len(cpus):
        os.sched_setaffinity(0, cpus[:threads])
        return threads
    return len(cpus) or os.cpu_count() or 1


class Trainer:
    """The two training loops (``step`` and ``fori``) of one network over one file of batches."""

    def __init__(self, path: str, key: int):
        import jax
        import jax.numpy as jnp
        import numpy as np
        import numpyro
        import numpyro.distributions as dist
        from jax.example_libraries import stax
        from numpyro.infer import SVI, Trace_ELBO

        with np.load(path) as stored:
            arrays = {name: stored[name] for name in stored.files}
        pixels = arrays.pop("batches")  # (epochs, batches, batch size, 784), uint8 grey levels
        # NumPy batches of grey levels in [0, 1], as a user's data pipeline gives them
        self.host_batches = pixels.astype(np.float32) / np.float32(255)
        self.device_batches = [jax.device_put(epoch) for epoch in self.host_batches]
        batch_size, x_dim = self.host_batches.shape[2:]
        hidden_dim, z_dim = arrays["decoder.0.weight"].shape

        encoder = stax.serial(
            stax.Dense(hidden_dim),
            stax.elementwise(jax.nn.leaky_relu, negative_slope=0.2),
            stax.Dense(2 * z_dim),
        )
        decoder = stax.serial(stax.Dense(hidden_dim), stax.Relu, stax.Dense(x_dim))

        def model(x):
            decode = numpyro.module("decoder", decoder, (batch_size, z_dim))
            with numpyro.plate("data", x.shape[0]):
                z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([z_dim]).to_event(1))
                numpyro.sample("x", dist.Bernoulli(logits=decode(z)).to_event(1), obs=x)

        def guide(x):
            encode = numpyro.module("encoder", encoder, (batch_size, x_dim))
            loc, log_var = jnp.split(encode(x), 2, axis=-1)
            with numpyro.plate("data", x.shape[0]):
                numpyro.sample("z", dist.Normal(loc, jnp.exp(0.5 * log_var)).to_event(1))

        def dense(prefix):  # torch's Linear (out, in) weight → stax's Dense (in, out)
            return (jnp.asarray(arrays[prefix + ".weight"].T), jnp.asarray(arrays[prefix + ".bias"]))

        self.initial = {
            "encoder$params": [dense("encoder.0"), (), dense("encoder.2")],
            "decoder$params": [dense("decoder.0"), (), dense("decoder.2")],
        }
        self.svi = SVI(model, guide, numpyro.optim.Adam(1e-3), Trace_ELBO())
        self.key = jax.random.PRNGKey(key)
        svi = self.svi

        def step(state, key, grey):  # one SVI step on a fresh binarization of the batch
            key, draw = jax.random.split(key)
            binary = jax.random.bernoulli(draw, grey).astype(grey.dtype)
            state, loss = svi.update(state, binary)
            return state, key, loss

        self.update = jax.jit(step)

        def whole_epoch(state, key, data):
            def body(index, carry):
                state, key, total = carry
                state, key, loss = step(state, key, data[index])
                return state, key, total + loss

            zero = jnp.zeros((), data.dtype)
            return jax.lax.fori_loop(0, data.shape[0], body, (state, key, zero))

        self.whole_epoch = jax.jit(whole_epoch)
        self.images_per_epoch = self.host_batches.shape[1] * batch_size
        self.reset()

    def reset(self):
        import jax

        first = (self.host_batches[0, 0] > 0.5).astype(self.host_batches.dtype)  # a binary batch
        start = self.svi.init(self.key, first, init_params=self.initial)
        self.states = {"step": start, "fori": start}
        binarize_key = jax.random.fold_in(self.key, 1)
        self.keys = {"step": binarize_key, "fori": binarize_key}

    def epoch(self, loop: str, index: int) -> dict:
        if loop == "step":
            state, key, losses = self.states["step"], self.keys["step"], []
            begin = time.perf_counter()
            for x in self.host_batches[index]:
                state, key, loss = self.update(state, key, x)
                losses.append(loss)
            loss.block_until_ready()
            seconds = time.perf_counter() - begin
            total = float(sum(float(value) for value in losses))
        elif loop == "fori":
            begin = time.perf_counter()
            key = self.keys["fori"]
            state, key, total = self.whole_epoch(self.states["fori"], key, self.device_batches[index])
            total.block_until_ready()
            seconds = time.perf_counter() - begin
            total = float(total)
        else:
            raise ValueError(f"loop must be 'step' or 'fori', got {loop!r}")
        self.states[loop], self.keys[loop] = state, key
        return {"seconds": seconds, "elbo": -total / self.images_per_epoch}


def per_call(function, seconds: float) -> float:
    """Seconds per call of ``function`` (which waits for its result): a first block of at least two calls
    and ``seconds``/4 sizes three timed blocks of about ``seconds``/3 each; their median."""
    begin, calls = time.perf_counter(), 0
    while calls < 2 or time.perf_counter() - begin < seconds / 4:
        function()
        calls += 1
    repeat = max(1, int(seconds / 3 / ((time.perf_counter() - begin) / calls)))
    blocks = []
    for _ in range(3):
        begin = time.perf_counter()
        for _ in range(repeat):
            function()
        blocks.append((time.perf_counter() - begin) / repeat)
    return statistics.median(blocks)


class Products:
    """Jitted fp32 products by shape, built on first use."""

    def __init__(self):
        self.functions = {}

    def get(self, kind: str, shape: tuple[int, int, int]):
        if (kind, shape) not in self.functions:
            self.functions[kind, shape] = self.build(kind, *shape)
        return self.functions[kind, shape]

    @staticmethod
    def build(kind: str, rows: int, width_in: int, width_out: int):
        import jax
        import numpy as np

        generator = np.random.default_rng(0)
        x = jax.device_put(generator.standard_normal((rows, width_in), dtype=np.float32))
        weight = jax.device_put(
            generator.standard_normal((width_out, width_in), dtype=np.float32) / np.sqrt(width_in)
        )
        if kind == "matmul":
            product = jax.jit(lambda x, weight: x @ weight.T)

            def call():
                return product(x, weight).block_until_ready()

        elif kind == "linear":
            bias = jax.device_put(generator.standard_normal(width_out, dtype=np.float32))
            grad = jax.device_put(generator.standard_normal((rows, width_out), dtype=np.float32))

            def forward_backward(x, weight, bias, grad):
                y, pullback = jax.vjp(lambda x, weight, bias: x @ weight.T + bias, x, weight, bias)
                return (y, *pullback(grad))

            layer = jax.jit(forward_backward)

            def call():
                return jax.block_until_ready(layer(x, weight, bias, grad))

        else:
            raise ValueError(f"kind must be 'linear' or 'matmul', got {kind!r}")
        call()  # compile
        return call


def serve(replies, threads: int) -> None:
    trainer, products = None, Products()
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        op = request["op"]
        if op == "versions":
            import jax
            import jaxlib
            import numpyro

            reply = {
                "jax": jax.__version__,
                "jaxlib": jaxlib.__version__,
                "numpyro": numpyro.__version__,
                "devices": [str(device) for device in jax.devices()],
                "threads": threads,
            }
        elif op == "load":
            trainer = Trainer(request["path"], int(request.get("key", 0)))
            reply = {"shape": list(trainer.host_batches.shape)}
        elif op == "reset":
            trainer.reset()
            reply = {}
        elif op == "epoch":
            reply = trainer.epoch(request["loop"], int(request["index"]))
        elif op == "gemm":
            call = products.get(request["kind"], tuple(int(size) for size in request["shape"]))
            reply = {"seconds": per_call(call, float(request["seconds"]))}
        else:
            raise ValueError(f"unknown request {op!r}")
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="XLA threads (default: one per CPU)")
    arguments = parser.parse_args()
    reply_stream = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints go to stderr, never into the replies
    serve(reply_stream, limit_threads(arguments.threads))
