"""A continuous normalising flow (FFJORD, Grathwohl et al. 2019) on a 2-D toy density.

The flow dz/dt = f_θ(t, z) carries a data point x = z(0) to z(1), and the change of
variables in continuous time, d log p(z(t))/dt = -tr(∂f/∂z), gives

    log p(x) = log N(z(1); 0, I) + Δ(1),   dΔ/dt = tr(∂f_θ/∂z),  Δ(0) = 0,

so one solve of the augmented state [z, Δ] gives the log-likelihood, and training
minimises its negative mean. The trace is exact (`jax.jacfwd`: two Jacobian-vector
products in 2-D) or Hutchinson's estimate εᵀ(∂f/∂z)ε with Rademacher noise ε drawn once
per batch and passed to the vector field through `args` (`--hutchinson`).

    python examples/cnf.py --density 8gaussians --out runs/cnf

Writes OUT/metrics.json (with the held-out NLL of the flow and of a fitted Gaussian),
OUT/checkpoint.eqx, OUT/loss.png and OUT/cnf.png (data, learned density, samples).
"""

import argparse
import os

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import neuralode
import neuralode.measure
import neuralode.training

import _common


class FFJORDField(eqx.Module):
    """The augmented vector field of [z, Δ] (last axis: 2 coordinates, then Δ): returns
    [f(t, z), tr(∂f/∂z)], the trace exact or, with `hutchinson=True`, estimated with the
    noise passed as `args` (shape of z)."""

    field: neuralode.MLPField
    hutchinson: bool = eqx.field(static=True)

    def __call__(self, t, y, args):
        z = y[..., :-1]
        if self.hutchinson:
            noise = args
            dz, jvp = jax.jvp(lambda z: self.field(t, z), (z,), (noise,))
            trace = jnp.sum(noise * jvp, axis=-1)
        else:
            # Points do not interact, so differentiating with respect to one shift v
            # of all of them gives every point's own Jacobian: two tangents in 2-D
            # through the batched network (faster than a per-point jacfwd under vmap).
            def shifted(v):
                out = self.field(t, z + jnp.broadcast_to(v, z.shape))
                return out, out

            jac, dz = jax.jacfwd(shifted, has_aux=True)(jnp.zeros(z.shape[-1], z.dtype))
            trace = jnp.trace(jac, axis1=-2, axis2=-1)
        return jnp.concatenate([dz, trace[..., None]], axis=-1)


def log_likelihood(model: neuralode.NeuralODE, x, noise=None):
    """log p(x) per point, and the solve's function evaluations."""
    y0 = jnp.concatenate([x, jnp.zeros_like(x[..., :1])], axis=-1)
    sol = model.solve(jnp.array([0.0, 1.0], x.dtype), y0, noise)
    z1, delta = sol.ys[-1, ..., :-1], sol.ys[-1, ..., -1]
    log_base = -0.5 * jnp.sum(z1**2, axis=-1) - 0.5 * z1.shape[-1] * jnp.log(2 * jnp.pi)
    nfe = neuralode.measure.function_evaluations(model.solver, sol.stats["num_steps"])
    return log_base + delta, nfe


def sample(model: neuralode.NeuralODE, z1):
    """Samples x = z(0), solving the flow backwards in time from base samples z(1)."""
    field = model.field.field
    dt0 = None if model.dt0 is None else -model.dt0
    return diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, z, args: field(t, z)),
        model.solver,
        t0=1.0,
        t1=0.0,
        dt0=dt0,
        y0=z1,
        stepsize_controller=model.stepsize_controller,
        max_steps=model.max_steps,
    ).ys[-1]


def in_chunks(fn, x, size):
    """fn over the rows of x in chunks of a fixed size (one compilation), padded."""
    pad = -len(x) % size
    xp = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
    out = [fn(xp[i : i + size]) for i in range(0, len(xp), size)]
    return np.concatenate([np.asarray(o) for o in out])[: len(x)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_training_arguments(
        parser,
        niters=500,
        batch_size=256,
        lr=3e-3,
        steps=8,
        out="runs/cnf",
        checkpoint_every=100,
    )
    g = parser.add_argument_group("problem")
    g.add_argument(
        "--density",
        choices=neuralode.data.TOY_DENSITIES,
        default="8gaussians",
        help="toy density (default: 8gaussians)",
    )
    g.add_argument(
        "--hutchinson",
        action="store_true",
        help="Hutchinson's trace estimator instead of the exact trace",
    )
    g.add_argument(
        "--num-train",
        type=_common.positive_int,
        default=20000,
        help="training points (default: 20000)",
    )
    g.add_argument(
        "--num-test",
        type=_common.positive_int,
        default=5000,
        help="held-out points (default: 5000)",
    )
    g.add_argument(
        "--width",
        type=_common.positive_int,
        default=64,
        help="hidden width of the MLP field (default: 64)",
    )
    g.add_argument(
        "--depth",
        type=_common.positive_int,
        default=3,
        help="hidden layers of the MLP field (default: 3)",
    )
    g.add_argument(
        "--grid",
        type=_common.positive_int,
        default=100,
        help="density plot resolution per axis (default: 100)",
    )
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = _common.parse_training_args(build_parser(), argv)
    key = jax.random.PRNGKey(args.seed)
    model_key, train_key, test_key, fit_key, sample_key = jax.random.split(key, 5)
    train = neuralode.data.sample_toy_density(args.density, train_key, args.num_train)
    test = neuralode.data.sample_toy_density(args.density, test_key, args.num_test)

    field = neuralode.MLPField(
        2, args.width, args.depth, time_dependent=True, key=model_key
    )
    model = _common.neural_ode_from_args(args, FFJORDField(field, args.hutchinson), 1.0)

    def sample_batch(key):
        index_key, noise_key = jax.random.split(key)
        x = train[jax.random.randint(index_key, (args.batch_size,), 0, len(train))]
        noise = jax.random.rademacher(noise_key, x.shape, x.dtype)
        return x, noise

    def loss_fn(model, batch):
        x, noise = batch
        logp, nfe = log_likelihood(model, x, noise if args.hutchinson else None)
        return -jnp.mean(logp), nfe

    model, metrics = _common.train(
        args,
        "cnf",
        loss_fn,
        model,
        sample_batch,
        fit_key,
        metadata={"density": args.density, "hutchinson": args.hutchinson},
        ignore=("grid", "num_test"),
    )
    if jax.process_index() != 0:
        return metrics  # process 0 evaluates and writes

    # Held-out likelihood with the exact trace, whatever the training used.
    exact = eqx.tree_at(lambda m: m.field, model, FFJORDField(model.field.field, False))
    logp_fn = eqx.filter_jit(lambda x: log_likelihood(exact, x)[0])
    chunk = min(2000, args.num_test)
    test_logp = in_chunks(logp_fn, test, chunk)
    metrics["test_nll"] = float(-np.mean(test_logp))
    metrics["gaussian_nll"] = neuralode.data.gaussian_nll(train, test)

    lim = 4.0
    axis = np.linspace(-lim, lim, args.grid)
    grid = jnp.asarray(
        np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2), train.dtype
    )
    density = np.exp(in_chunks(logp_fn, grid, chunk)).reshape(args.grid, args.grid)
    z1 = jax.random.normal(sample_key, (min(args.num_test, 2000), 2), train.dtype)
    samples = np.asarray(eqx.filter_jit(sample)(model, z1))

    neuralode.training.save_metrics(os.path.join(args.out, "metrics.json"), metrics)
    _common.plot_loss(
        metrics,
        os.path.join(args.out, "loss.png"),
        title=f"CNF {args.density}: training NLL ({args.adjoint})",
    )
    plot_density(
        np.asarray(test),
        density,
        samples,
        lim,
        args.density,
        os.path.join(args.out, "cnf.png"),
    )
    print(
        f"held-out NLL {metrics['test_nll']:.4f} (fitted Gaussian "
        f"{metrics['gaussian_nll']:.4f}); wrote {args.out}/"
    )
    return metrics


def plot_density(data, density, samples, lim, name, path):
    plt = _common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2), dpi=80)
    bins = np.linspace(-lim, lim, 80)
    axes[0].hist2d(data[:, 0], data[:, 1], bins=bins, cmap="viridis")
    axes[0].set_title(f"data ({name})")
    axes[1].imshow(
        density, origin="lower", extent=(-lim, lim, -lim, lim), cmap="viridis"
    )
    axes[1].set_title("learned density")
    axes[2].hist2d(samples[:, 0], samples[:, 1], bins=bins, cmap="viridis")
    axes[2].set_title("samples")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
