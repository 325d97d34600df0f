"""Learn the dynamics of a damped pendulum, dθ/dt = ω, dω/dt = -4 sin θ - 0.3 ω, from
simulated trajectories, and roll the learned model out against the truth from initial
states it has not seen.

    python examples/physics.py --out runs/physics

Training fits a neural vector field dy/dt = f_θ(y), y = (θ, ω), to random windows of the
training trajectories. Writes OUT/metrics.json (with the mean absolute error of the
held-out rollouts), OUT/checkpoint.eqx, OUT/loss.png and OUT/physics.png.
"""

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

import neuralode
import neuralode.measure
import neuralode.training

import _common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_training_arguments(
        parser,
        niters=1500,
        batch_size=64,
        lr=3e-3,
        steps=10,
        out="runs/physics",
        checkpoint_every=100,
    )
    g = parser.add_argument_group("problem")
    g.add_argument(
        "--num-trajectories",
        type=_common.positive_int,
        default=32,
        help="simulated training trajectories (default: 32)",
    )
    g.add_argument(
        "--num-times",
        type=_common.positive_int,
        default=201,
        help="samples per trajectory on [0, 10] (default: 201)",
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
        default=64,
        help="hidden width of the MLP field (default: 64)",
    )
    g.add_argument(
        "--depth",
        type=_common.positive_int,
        default=2,
        help="hidden layers of the MLP field (default: 2)",
    )
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = _common.parse_training_args(parser, argv)
    if not 2 <= args.window <= args.num_times:
        parser.error(f"--window must be between 2 and --num-times={args.num_times}")

    key = jax.random.PRNGKey(args.seed)
    model_key, data_key, fit_key = jax.random.split(key, 3)
    ts = jnp.linspace(0.0, 10.0, args.num_times)
    train, test = simulate(data_key, args.num_trajectories, ts)
    window_ts = ts[: args.window]
    model = _common.neural_ode_from_args(
        args,
        neuralode.MLPField(2, args.width, args.depth, key=model_key),
        float(window_ts[-1]),
    )

    def sample_batch(key):
        return neuralode.data.sample_windows(key, train, args.batch_size, args.window)

    def loss_fn(model, batch):
        y0, targets = batch
        sol = model.solve(window_ts, y0)
        nfe = neuralode.measure.function_evaluations(
            model.solver, sol.stats["num_steps"]
        )
        return jnp.mean((sol.ys - targets) ** 2), nfe

    model, metrics = _common.train(
        args,
        "physics",
        loss_fn,
        model,
        sample_batch,
        fit_key,
        metadata={"system": "damped pendulum"},
        batch_axes=(0, 1),
    )
    if jax.process_index() != 0:
        return metrics  # process 0 evaluates and writes

    # Roll out from the held-out initial states over the whole span.
    rollout = _common.solve_accurately(model.field, ts, test[:, 0])
    rollout = jnp.swapaxes(rollout, 0, 1)
    metrics["rollout_mae"] = float(jnp.mean(jnp.abs(rollout - test)))
    write_outputs(args, metrics, ts, test, rollout)
    return metrics


def simulate(key, num_trajectories, ts):
    """`num_trajectories` training trajectories and 4 held-out ones, sampled at `ts`."""
    # One simulation (one compilation) for the training and the held-out trajectories.
    trajectories = neuralode.data.damped_pendulum_trajectories(
        key, num_trajectories + 4, ts
    )
    return trajectories[:-4], trajectories[-4:]


def write_outputs(args, metrics, ts, test, rollout):
    """OUT/metrics.json, OUT/loss.png and OUT/physics.png, and a one-line summary."""
    neuralode.training.save_metrics(os.path.join(args.out, "metrics.json"), metrics)
    _common.plot_loss(
        metrics,
        os.path.join(args.out, "loss.png"),
        title=f"pendulum: training loss ({args.adjoint})",
    )
    plot_rollout(
        np.asarray(ts),
        np.asarray(test),
        np.asarray(rollout),
        os.path.join(args.out, "physics.png"),
    )
    print(
        f"final loss {metrics['loss'][-1]:.4g}, held-out rollout MAE "
        f"{metrics['rollout_mae']:.4g}; wrote {args.out}/"
    )


def plot_rollout(ts, truth, pred, path):
    plt = _common.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=80)
    for i in range(len(truth)):
        ax1.plot(ts, truth[i, :, 0], "k-", lw=1, label="truth" if i == 0 else None)
        ax1.plot(
            ts,
            pred[i, :, 0],
            f"C{i}--",
            lw=1.2,
            label="learned rollout" if i == 0 else None,
        )
        ax2.plot(truth[i, :, 0], truth[i, :, 1], "k-", lw=1)
        ax2.plot(pred[i, :, 0], pred[i, :, 1], f"C{i}--", lw=1.2)
    ax1.set_xlabel("t")
    ax1.set_ylabel("angle θ")
    ax1.legend(fontsize=7)
    ax1.set_title("held-out initial states")
    ax2.set_xlabel("θ")
    ax2.set_ylabel("ω")
    ax2.set_title("phase portrait")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
