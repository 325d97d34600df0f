"""Fit the spiral ODE dy/dt = (y³)A, A = [[-0.1, 2], [-2, -0.1]], y0 = [2, 0] (the
problem of torchdiffeq's `ode_demo.py`) from random windows of its trajectory.

    python examples/spiral.py --adjoint symplectic --out runs/spiral

Writes OUT/metrics.json, OUT/checkpoint.eqx, OUT/loss.png and OUT/spiral.png (the
learned trajectory from y0 over the whole time span against the truth).
"""

import argparse
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import neuralode
import neuralode.measure
import neuralode.training

import _common


class CubedInputField(eqx.Module):
    """dy/dt = MLP(y³): the cubed input of torchdiffeq's demo, which makes the field of
    the true system (linear in y³) easy to represent."""

    field: neuralode.MLPField

    def __call__(self, t, y, args=None):
        return self.field(t, y**3, args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_training_arguments(
        parser,
        niters=2000,
        batch_size=20,
        lr=3e-3,
        steps=19,
        out="runs/spiral",
        checkpoint_every=100,
    )
    g = parser.add_argument_group("problem")
    g.add_argument(
        "--num-times",
        type=_common.positive_int,
        default=1000,
        help="samples of the true trajectory on [0, 25] (default: 1000)",
    )
    g.add_argument(
        "--window",
        type=_common.positive_int,
        default=20,
        help="samples per training window (default: 20)",
    )
    g.add_argument(
        "--width",
        type=_common.positive_int,
        default=50,
        help="hidden width of the MLP field (default: 50)",
    )
    g.add_argument(
        "--depth",
        type=_common.positive_int,
        default=1,
        help="hidden layers of the MLP field (default: 1)",
    )
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = _common.parse_training_args(parser, argv)
    if not 2 <= args.window <= args.num_times:
        parser.error(f"--window must be between 2 and --num-times={args.num_times}")

    ts, ys = neuralode.data.spiral_trajectory(args.num_times)
    window_ts = ts[: args.window]
    model_key, data_key = jax.random.split(jax.random.PRNGKey(args.seed))
    field = CubedInputField(
        neuralode.MLPField(2, args.width, args.depth, key=model_key)
    )
    model = _common.neural_ode_from_args(args, field, float(window_ts[-1]))

    def sample_batch(key):
        return neuralode.data.sample_windows(key, ys, args.batch_size, args.window)

    def loss_fn(model, batch):
        y0, targets = batch
        sol = model.solve(window_ts, y0)
        nfe = neuralode.measure.function_evaluations(
            model.solver, sol.stats["num_steps"]
        )
        return jnp.mean(jnp.abs(sol.ys - targets)), nfe

    model, metrics = _common.train(
        args, "spiral", loss_fn, model, sample_batch, data_key, batch_axes=(0, 1)
    )
    if jax.process_index() != 0:
        return metrics  # process 0 evaluates and writes

    # The whole trajectory from y0, solved accurately: how well the field was learned.
    pred = _common.solve_accurately(model.field, ts, ys[0])
    metrics["trajectory_mae"] = float(jnp.mean(jnp.abs(pred - ys)))
    neuralode.training.save_metrics(os.path.join(args.out, "metrics.json"), metrics)
    _common.plot_loss(
        metrics,
        os.path.join(args.out, "loss.png"),
        title=f"spiral: training loss ({args.adjoint})",
    )
    plot_trajectory(ts, ys, pred, os.path.join(args.out, "spiral.png"))
    print(
        f"final loss {metrics['loss'][-1]:.4g}, whole-trajectory MAE "
        f"{metrics['trajectory_mae']:.4g}; wrote {args.out}/"
    )
    return metrics


def plot_trajectory(ts, ys, pred, path):
    plt = _common.pyplot()
    ts, ys, pred = np.asarray(ts), np.asarray(ys), np.asarray(pred)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=80)
    for i, style in enumerate(("-", "--")):
        ax1.plot(ts, ys[:, i], "k" + style, lw=1, label=f"true y{i + 1}")
        ax1.plot(ts, pred[:, i], "C1" + style, lw=1, label=f"learned y{i + 1}")
    ax1.set_xlabel("t")
    ax1.legend(fontsize=7, ncol=2)
    ax1.set_title("trajectories")
    ax2.plot(ys[:, 0], ys[:, 1], "k-", lw=1, label="true")
    ax2.plot(pred[:, 0], pred[:, 1], "C1--", lw=1, label="learned")
    ax2.set_xlabel("y1")
    ax2.set_ylabel("y2")
    ax2.set_aspect("equal")
    ax2.legend(fontsize=7)
    ax2.set_title("phase portrait")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
