"""Time to a target: the CNF example trained with each strategy until its held-out
negative log-likelihood reaches a fixed target.

The model, data, batches and optimiser are those of `examples/cnf.py` (FFJORD on a 2-D
toy density, exact trace); every strategy starts from the same weights and draws the
same batches, so the exact ones follow the same path (to rounding) and differ only in
time and memory, while the continuous adjoint's approximate gradient may change the
number of iterations. Every `eval_every` iterations the held-out NLL (exact trace,
fixed test points) is computed; training stops at the first evaluation at or below the
target, or after `max_iters`.

Reported per strategy: iterations to the target, wall-clock of the training steps
(evaluation and compilation excluded, compilation listed apart), XLA's static memory of
the compiled step (arguments, outputs and temporaries; the same on every device, and on
a GPU close to its measured peak, see `report.py`'s `peak_bytes`), and the final
held-out NLL.

    python benchmarks/time_to_target.py --quick --out benchmarks/results/cpu
    python benchmarks/time_to_target.py --out benchmarks/results/<device>   # on a GPU

`--render DIR` rewrites DIR/time_to_target.md from DIR/time_to_target.json.
"""

import os
import sys
import time

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import neuralode
import neuralode.measure
import neuralode.training

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
sys.path.insert(0, HERE)
import cnf  # noqa: E402  (the example's flow and likelihood)
from reporting import script  # noqa: E402

SIZES = {
    # The CPU size: the example's defaults (8 constant Tsit5 steps, width 64, depth 3).
    "quick": dict(
        density="8gaussians",
        width=64,
        depth=3,
        batch=256,
        steps=8,
        lr=3e-3,
        num_test=2000,
        eval_every=25,
        max_iters=500,
        target_nll=2.9,  # symplectic reached it at 275 iterations on the CPU
    ),
    # A GPU: a wider field, finer steps and larger batches.
    "full": dict(
        density="8gaussians",
        width=256,
        depth=3,
        batch=1024,
        steps=32,
        lr=3e-3,
        num_test=10000,
        eval_every=25,
        max_iters=1000,
        target_nll=2.88,
    ),
}


def strategies() -> dict:
    """Every strategy by its registry name, and Diffrax's recursive checkpointing."""
    out = {name: neuralode.get_adjoint(name) for name in neuralode.ADJOINT_NAMES}
    out["RecursiveCheckpointAdjoint()"] = diffrax.RecursiveCheckpointAdjoint()
    return out


def build(size: dict, adjoint):
    key = jax.random.PRNGKey(0)
    model_key, train_key, test_key, run_key = jax.random.split(key, 4)
    train = neuralode.data.sample_toy_density(size["density"], train_key, 20000)
    test = neuralode.data.sample_toy_density(
        size["density"], test_key, size["num_test"]
    )
    field = neuralode.MLPField(
        2, size["width"], size["depth"], time_dependent=True, key=model_key
    )
    solver = diffrax.Tsit5()
    if isinstance(adjoint, neuralode.ReversibleAdjoint):
        solver = adjoint.wrap(solver)  # the only scheme it differentiates
    model = neuralode.NeuralODE(
        cnf.FFJORDField(field, False),
        solver=solver,
        adjoint=adjoint,
        stepsize_controller=diffrax.ConstantStepSize(),
        dt0=1.0 / size["steps"],
        max_steps=size["steps"] + 1,
    )

    def sample_batch(key):
        return train[jax.random.randint(key, (size["batch"],), 0, len(train))]

    def loss_fn(model, x):
        logp, nfe = cnf.log_likelihood(model, x)
        return -jnp.mean(logp), nfe

    return model, loss_fn, sample_batch, test, run_key


class Run:
    """One strategy's training: its compiled step, state and running totals."""

    def __init__(self, size: dict, name: str, adjoint):
        self.name, self.size = name, size
        self.model, loss_fn, sample_batch, test, key = build(size, adjoint)
        optimiser = optax.adam(size["lr"])
        step = neuralode.training.make_train_step(
            loss_fn, optimiser, sample_batch, self.model
        )
        self.state = neuralode.training.TrainState.init(self.model, optimiser, key)
        tic = time.perf_counter()
        self.step = step.lower(self.state).compile()
        self.row = dict(
            strategy=name,
            reached=False,
            iterations=0,
            train_s=0.0,
            compile_s=time.perf_counter() - tic,
            xla_bytes=neuralode.measure.compiled_total_bytes(self.step),
            final_nll=float("nan"),
        )
        self.nll = eqx.filter_jit(lambda m: -jnp.mean(cnf.log_likelihood(m, test)[0]))

    @property
    def running(self) -> bool:
        return (
            not self.row["reached"] and self.row["iterations"] < self.size["max_iters"]
        )

    def advance(self) -> None:
        """`eval_every` iterations, timed, then the held-out NLL (not timed)."""
        tic = time.perf_counter()
        for _ in range(self.size["eval_every"]):
            self.state, _ = self.step(self.state)
        jax.block_until_ready(self.state)
        self.row["train_s"] += time.perf_counter() - tic
        self.row["iterations"] += self.size["eval_every"]
        nll = float(self.nll(eqx.combine(self.state.params, self.model)))
        self.row["final_nll"] = nll
        self.row["reached"] = nll <= self.size["target_nll"]
        print(f"  {self.name}: {self.row['iterations']} iterations, NLL {nll:.4f}")


def train_to_target(size: dict) -> list[dict]:
    """All strategies trained in turns of `eval_every` iterations (interleaved, so a
    change in the machine's load falls on all of them alike)."""
    runs = [Run(size, name, adjoint) for name, adjoint in strategies().items()]
    while any(run.running for run in runs):
        for run in runs:
            if run.running:
                run.advance()
    return [run.row for run in runs]


def render(result: dict) -> str:
    s = result["size"]
    lines = [
        f"# Time to a held-out NLL of {s['target_nll']} ({result['device']})",
        "",
        f"CNF example: {s['density']}, MLP width {s['width']}, depth {s['depth']}, "
        f"batch {s['batch']}, {s['steps']} constant Tsit5 steps, Adam {s['lr']:g}, "
        f"exact trace; held-out NLL on {s['num_test']} points every "
        f"{s['eval_every']} iterations, at most {s['max_iters']}.",
        "",
        "| strategy | reached | iterations | training (s) | s / iteration | "
        "compile (s) | memory (MiB, XLA) | final NLL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['strategy']} | {'yes' if r['reached'] else 'no'} | "
            f"{r['iterations']} | {r['train_s']:.1f} | "
            f"{r['train_s'] / r['iterations']:.4f} | {r['compile_s']:.1f} | "
            f"{r['xla_bytes'] / 2**20:.1f} | {r['final_nll']:.4f} |"
        )
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def run(quick: bool) -> dict:
    size = SIZES["quick" if quick else "full"]
    return dict(size=size, rows=train_to_target(size))


if __name__ == "__main__":
    script.main("time_to_target", __doc__.split("\n\n")[0], run, render)
