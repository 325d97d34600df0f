"""What the example scripts share: their command-line options (the gradient strategy,
the solver and its step control, the training loop's settings) with clear errors for
bad values, the call of `neuralode.training.fit` with them, and the loss plot.

The library's errors name its keyword arguments (`resume=True`, `out_dir`); here they
are reported in terms of the flags that set them (`--resume`, `--out`).
"""

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import diffrax
import jax
import numpy as np
import optax

import neuralode
import neuralode.training as training

SOLVERS: dict[str, type[diffrax.AbstractSolver]] = {
    "euler": diffrax.Euler,
    "heun": diffrax.Heun,
    "midpoint": diffrax.Midpoint,
    "ralston": diffrax.Ralston,
    "bosh3": diffrax.Bosh3,
    "tsit5": diffrax.Tsit5,
    "dopri5": diffrax.Dopri5,
    "dopri8": diffrax.Dopri8,
}

_UNSET = object()  # marks an option not given on the command line

# Flags of the run itself, not of what it trains: not part of the configuration.
_NOT_CONFIG = (
    "niters",
    "out",
    "resume",
    "overwrite",
    "checkpoint_every",
    "no_progress",
    "devices",
    "coordinator",
    "num_processes",
    "process_id",
)

# Flags that steer the optimisation but not what is learnt (model, data, seed): a run may
# be resumed with other values of them, e.g. a smaller --lr after a divergence.
RESUME_MAY_CHANGE = (
    "adjoint",
    "checkpoints",
    "memory_budget",
    "solver",
    "steps",
    "rtol",
    "atol",
    "max_steps",
    "lr",
    "batch_size",
)


def positive_int(text: str) -> int:
    """`argparse` type: an int >= 1."""
    return _positive(text, int, "a positive integer")


def positive_float(text: str) -> float:
    """`argparse` type: a finite float > 0."""
    return _positive(text, float, "a positive number")


def positive_int_or_all(text: str) -> int | str:
    """`argparse` type: a positive int, or `all`."""
    return text if text == "all" else _positive(text, int, "a positive integer or all")


def _positive(text: str, kind: type, what: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def add_training_arguments(
    parser: argparse.ArgumentParser,
    *,
    niters: int,
    batch_size: int,
    lr: float,
    steps: int,
    out: str,
    solver: str = "tsit5",
    adjoint: str = "symplectic",
    checkpoint_every: int = 100,
    max_steps: int = 1024,
) -> argparse.ArgumentParser:
    """Add the options every example shares to `parser`, with the example's defaults.

    `--adjoint` (choices `neuralode.ADJOINT_NAMES`), `--solver` (choices
    `SOLVERS`), `--steps N` (constant steps: N per solve) or `--rtol`/`--atol`
    (adaptive steps, `--max-steps` bounding them), `--niters`, `--batch-size`, `--lr`,
    `--seed`, `--out`, `--resume`, `--overwrite`, `--checkpoint-every`,
    `--no-progress`. Parse with `parse_training_args`, which checks the
    combinations and the output directory.
    """
    g = parser.add_argument_group("training")
    # All in the one group "training", in the order --help lists them.
    _add_adjoint_arguments(g, adjoint=adjoint)
    _add_stepping_arguments(g, solver=solver, steps=steps, max_steps=max_steps)
    _add_optimisation_arguments(g, niters=niters, batch_size=batch_size, lr=lr)
    _add_output_arguments(g, out=out, checkpoint_every=checkpoint_every)
    _add_device_arguments(parser)
    parser.set_defaults(_default_steps=steps, _default_max_steps=max_steps)
    return parser


def _add_adjoint_arguments(group: Any, *, adjoint: str) -> None:
    """`--adjoint` and what tunes it: `--checkpoints`, `--memory-budget`."""
    group.add_argument(
        "--adjoint",
        choices=(*neuralode.ADJOINT_NAMES, "auto"),
        default=adjoint,
        help=f"gradient strategy (default: {adjoint}); auto: the exact one with the "
        "least estimated work "
        "whose gradient fits in --memory-budget (neuralode.choose_adjoint, on the "
        "training step itself; prints its table)",
    )
    group.add_argument(
        "--checkpoints",
        type=positive_int_or_all,
        default=None,
        help="with --adjoint symplectic: checkpoints kept for the backward pass, an "
        "int or 'all' (every step; default: Diffrax's number, about "
        "sqrt(2 * max steps))",
    )
    group.add_argument(
        "--memory-budget",
        default=None,
        help="with --adjoint auto: the gradient's memory budget, e.g. 2GiB or 500MB, "
        "or a fraction of the device's memory such as 0.5",
    )


def _add_stepping_arguments(
    group: Any, *, solver: str, steps: int, max_steps: int
) -> None:
    """`--solver` and its step control: `--steps`, or `--rtol`/`--atol` with
    `--max-steps`."""
    group.add_argument(
        "--solver",
        choices=tuple(SOLVERS),
        default=solver,
        help=f"explicit Runge-Kutta solver (default: {solver})",
    )
    group.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help=f"constant step size: N steps per solve (default: {steps} "
        "unless --rtol/--atol are given)",
    )
    group.add_argument(
        "--rtol",
        type=positive_float,
        default=None,
        help="adaptive steps (PID controller) with this relative tolerance; "
        "--atol defaults to it",
    )
    group.add_argument(
        "--atol",
        type=positive_float,
        default=None,
        help="adaptive steps with this absolute tolerance; --rtol defaults to it",
    )
    group.add_argument(
        "--max-steps",
        type=positive_int,
        default=None,
        help=f"bound on adaptive steps per solve (default: {max_steps}); "
        "the memory of backprop and symplectic grows with it",
    )


def _add_optimisation_arguments(
    group: Any, *, niters: int, batch_size: int, lr: float
) -> None:
    """`--niters`, `--batch-size`, `--lr` and `--seed`."""
    group.add_argument(
        "--niters",
        type=positive_int,
        default=niters,
        help=f"training iterations, in total (default: {niters})",
    )
    group.add_argument(
        "--batch-size",
        type=positive_int,
        default=batch_size,
        help=f"minibatch size (default: {batch_size})",
    )
    group.add_argument(
        "--lr",
        type=positive_float,
        default=lr,
        help=f"Adam learning rate (default: {lr})",
    )
    group.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def _add_output_arguments(group: Any, *, out: str, checkpoint_every: int) -> None:
    """`--out` and how the run uses it: `--resume`, `--overwrite`,
    `--checkpoint-every`, `--no-progress`."""
    group.add_argument("--out", default=out, help=f"output directory (default: {out})")
    group.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoint.eqx with its options; "
        f"{', '.join('--' + k.replace('_', '-') for k in RESUME_MAY_CHANGE)} "
        "may be given anew",
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh even though OUT holds a checkpoint (which is replaced)",
    )
    group.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=checkpoint_every,
        help=f"checkpoint every N iterations (default: {checkpoint_every})",
    )
    group.add_argument(
        "--no-progress", action="store_true", help="hide the progress bar"
    )


def parse_training_args(
    parser: argparse.ArgumentParser, argv: list[str] | None = None
) -> argparse.Namespace:
    """Parse `argv`, check the output directory
    (`neuralode.training.check_output_dir`) and the
    combinations `add_training_arguments` allows (`--steps` excludes `--rtol`/`--atol`/
    `--max-steps`), so that a mistake is reported before any data is made or anything
    compiled, and fill in the defaults of the step control.

    With `--resume`, the options of `RESUME_MAY_CHANGE` that are not given
    keep the checkpoint's values, so that a plain `--resume` continues the same run;
    the step control (`--steps`, `--rtol`, `--atol`, `--max-steps`) is kept or
    replaced as a whole, unless only `--max-steps` is given."""
    unset = argparse.Namespace(**{k: _UNSET for k in RESUME_MAY_CHANGE})
    given = {
        k for k, v in vars(parser.parse_args(argv, unset)).items() if v is not _UNSET
    } & set(RESUME_MAY_CHANGE)
    args = parser.parse_args(argv)
    _start_processes(parser, args)
    if args.resume and args.overwrite:
        parser.error("--resume continues OUT's checkpoint and --overwrite replaces it")
    try:
        path = training.check_output_dir(
            args.out, resume=args.resume, overwrite=args.overwrite
        )
        saved = training.Checkpoint.read_config(path) if args.resume else {}
    except training.CheckpointError as e:
        parser.error(in_flags(str(e)))
    keep = set(RESUME_MAY_CHANGE) - given
    if given & {"steps", "rtol", "atol"}:
        keep -= {"steps", "rtol", "atol", "max_steps"}
    for k in keep & set(saved):
        setattr(args, k, saved[k])
    if "max_steps" not in given and args.rtol is None and args.atol is None:
        args.max_steps = None  # older checkpoints stored it with constant steps too

    adaptive = args.rtol is not None or args.atol is not None
    if args.steps is not None and adaptive:
        parser.error(
            "--steps (constant steps) cannot be combined with --rtol/--atol "
            "(adaptive steps); pass one or the other"
        )
    if adaptive and args.solver == "euler":
        parser.error(
            "--solver euler has no error estimate, so it cannot take adaptive "
            "steps (--rtol/--atol); use --steps or another solver"
        )
    if not adaptive and args.max_steps is not None:
        parser.error(
            "--max-steps bounds adaptive steps (--rtol/--atol); constant steps take "
            "exactly --steps per solve"
        )
    if args.checkpoints is not None and args.adjoint != "symplectic":
        parser.error("--checkpoints sets the schedule of --adjoint symplectic only")
    if (args.memory_budget is None) != (args.adjoint != "auto"):
        parser.error("--adjoint auto needs --memory-budget, which only it takes")
    if args.memory_budget is not None:
        args.memory_budget = _budget(args.memory_budget)
    if adaptive:
        args.rtol = args.atol if args.rtol is None else args.rtol
        args.atol = args.rtol if args.atol is None else args.atol
        if args.max_steps is None:
            args.max_steps = args._default_max_steps
    elif args.steps is None:
        args.steps = args._default_steps
    del args._default_steps, args._default_max_steps
    _check_devices(parser, args)
    return args


def solver_from_name(name: str) -> diffrax.AbstractSolver:
    """The Diffrax solver called `name`, one of `SOLVERS`."""
    try:
        return SOLVERS[name]()
    except KeyError:
        raise ValueError(
            f"Unknown solver {name!r}; valid names are {list(SOLVERS)}."
        ) from None


def solver_from_args(args: argparse.Namespace) -> diffrax.AbstractSolver:
    """The solver of `--solver`; for `--adjoint reversible`, which differentiates
    only reversible solvers, made reversible (`neuralode.Reversible`), saying so."""
    solver = solver_from_name(args.solver)
    if args.adjoint != "reversible":
        return solver
    reversible = neuralode.ReversibleAdjoint().wrap(solver)
    print(
        f"--adjoint reversible: solving with neuralode.Reversible("
        f"{type(solver).__name__}(), coupling={reversible.coupling}), the "
        f"algebraically reversible scheme built on {args.solver} (another "
        "discretisation of the same ODE, of the same order)"
    )
    return reversible


def stepping_from_args(
    args: argparse.Namespace, duration: float
) -> tuple[diffrax.AbstractStepSizeController, float | None, int]:
    """`(stepsize_controller, dt0, max_steps)` for a solve over an interval of length
    `duration`: `args.steps` constant steps, or a PID controller with `args.rtol`,
    `args.atol` and `args.max_steps`."""
    if args.steps is not None:
        # One spare step: rounding may leave a last step of negligible size.
        return diffrax.ConstantStepSize(), duration / args.steps, args.steps + 1
    controller = diffrax.PIDController(rtol=args.rtol, atol=args.atol)
    return controller, None, args.max_steps


def neural_ode_from_args(
    args: argparse.Namespace, field: Any, duration: float
) -> neuralode.NeuralODE:
    """A `neuralode.NeuralODE` of `field` with the solver, gradient strategy and step
    control of the options, for solves over intervals of length `duration`."""
    controller, dt0, max_steps = stepping_from_args(args, duration)
    return neuralode.NeuralODE(
        field,
        solver=solver_from_args(args),
        adjoint=adjoint_from_args(args),
        stepsize_controller=controller,
        dt0=dt0,
        max_steps=max_steps,
    )


def solve_accurately(field: Any, ts: Any, y0: Any) -> Any:
    """The solution of the vector field `field` from `y0`, saved at `ts`, with tight
    adaptive steps whatever the training used: it shows how well the field was
    learned, not the error of the training's solver."""
    return neuralode.data.simulate(
        field, y0, ts, rtol=1e-6, atol=1e-8, max_steps=100_000, throw=False
    )


def _budget(text: str) -> int | float | str:
    """`--memory-budget` as `neuralode.choose_adjoint` reads it: a fraction of the
    device's memory (a number up to 1), bytes (a larger number) or a string with units
    (`2GiB`), which it checks first thing."""
    try:
        number = float(text)
    except ValueError:
        return text
    return number if number <= 1 else int(number)


def adjoint_from_args(args: argparse.Namespace) -> diffrax.AbstractAdjoint:
    """The gradient strategy of `--adjoint` (and `--checkpoints`). For `--adjoint
    auto`, symplectic until `train` chooses on the training step."""
    if args.adjoint == "auto":
        return neuralode.SymplecticAdjoint()
    if args.checkpoints is not None:
        return neuralode.get_adjoint(args.adjoint, checkpoints=args.checkpoints)
    return neuralode.get_adjoint(args.adjoint)


def choose_on_training_step(
    args: argparse.Namespace, loss_fn: Callable, model: Any, sample_batch: Callable, key
) -> tuple[Any, str]:
    """For `--adjoint auto`: `model` with the strategy `neuralode.choose_adjoint` picks
    for the gradient of `loss_fn` on one batch, and its name (the table is printed).
    Otherwise `model` and `--adjoint`."""
    if args.adjoint != "auto":
        return model, args.adjoint
    is_adjoint = lambda x: isinstance(x, diffrax.AbstractAdjoint)

    def with_adjoint(model, adjoint):
        return jax.tree_util.tree_map(
            lambda x: adjoint if is_adjoint(x) else x, model, is_leaf=is_adjoint
        )

    try:
        choice = neuralode.choose_adjoint(
            lambda adjoint, model, batch: loss_fn(with_adjoint(model, adjoint), batch)[
                0
            ],
            model,
            sample_batch(key),
            memory_budget=args.memory_budget,
        )
    except ValueError as e:
        message = str(e).replace("`memory_budget`", "--memory-budget")
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from e
    print(choice)
    return with_adjoint(model, choice.adjoint), choice.name


def run_config(args: argparse.Namespace, ignore: tuple[str, ...] = ()) -> dict:
    """The options that define a run, stored in its checkpoint and compared on
    `--resume`: all but `--niters`, `--out`, `--resume`, `--overwrite`,
    `--checkpoint-every`, `--no-progress` and the example's own `ignore` (options that
    only change what is evaluated or plotted). Of these, `RESUME_MAY_CHANGE`
    may differ on resume."""
    skip = _NOT_CONFIG + ignore
    return {k: v for k, v in sorted(vars(args).items()) if k not in skip}


# The library's keyword arguments, as the flags that set them.
_FLAGS = {
    "`resume=True`": "--resume",
    "`overwrite=True`": "--overwrite",
    "`out_dir`": "--out",
    "a smaller learning rate": "a smaller --lr",
    "Raise `memory_budget`": "Raise --memory-budget",
    "`devices='all'`": "--devices all",
    "`devices`": "--devices",
}


def in_flags(message: str) -> str:
    """A library error message, with its keyword arguments named as flags."""
    for keyword, flag in _FLAGS.items():
        message = message.replace(keyword, flag)
    return message


@contextlib.contextmanager
def exit_on_training_error() -> Iterator[None]:
    """As a command-line script should: a `neuralode.training.CheckpointError` or
    `TrainingStopped` (divergence included) becomes a one-line message on stderr and
    exit status 1; Ctrl-C or SIGTERM, after `fit` has checkpointed the last good
    state, a one-line message and exit status 130."""
    try:
        with training.interrupt_on_sigterm():
            yield
    except (training.CheckpointError, training.TrainingStopped) as e:
        hint = (
            " (raise --max-steps, or loosen --rtol/--atol)"
            if "max_steps" in str(e)
            else ""
        )
        print(f"error: {in_flags(str(e))}{hint}", file=sys.stderr)
        raise SystemExit(1) from e
    except KeyboardInterrupt as e:
        message = in_flags(str(e)) or "interrupted before training started."
        print(f"stopped: {message}", file=sys.stderr)
        raise SystemExit(130) from e


def train(
    args: argparse.Namespace,
    example: str,
    loss_fn: Callable[[Any, Any], Any],
    model: Any,
    sample_batch: Callable[[Any], Any],
    key: Any,
    *,
    metadata: dict[str, Any] | None = None,
    ignore: tuple[str, ...] = (),
    batch_axes: Any = 0,
) -> tuple[Any, dict[str, Any]]:
    """`neuralode.training.fit` with Adam and the options of `add_training_arguments`,
    recording the forward solve's function evaluations `nfe` (the `aux` output of
    `loss_fn`), and errors reported as `exit_on_training_error` says. `batch_axes`:
    the batch axis of each part of a batch, as `fit` takes it."""
    model, adjoint = choose_on_training_step(args, loss_fn, model, sample_batch, key)
    with exit_on_training_error():
        return training.fit(
            loss_fn,
            model,
            optax.adam(args.lr),
            sample_batch,
            niters=args.niters,
            key=key,
            out_dir=args.out,
            metrics={"nfe": lambda step: int(step.aux)},
            config={"example": example, **run_config(args, ignore)},
            may_change=RESUME_MAY_CHANGE,
            metadata={
                "adjoint": adjoint,
                "solver": args.solver,
                **(metadata or {}),
            },
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            desc=f"{example}/{adjoint}",
            devices=args.devices,
            batch_axes=batch_axes,
        )


def plot_loss(metrics: dict[str, Any], path: str, *, title: str) -> None:
    """Save a PNG of the training loss per iteration (log scale) to `path`."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=90)
    losses = metrics["loss"]
    ax.plot(
        np.arange(1, len(losses) + 1),
        losses,
        lw=1,
        marker="o" if len(losses) < 2 else None,
    )
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def pyplot() -> Any:
    """`matplotlib.pyplot` on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# Devices and processes: data parallel training (neuralode.training.fit's `devices`).


def _add_device_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "devices",
        "data parallel: each batch is split over the devices, the model replicated. "
        "For several processes (hosts), start one per host with the same flags and "
        "its own --process-id (or set JAX_COORDINATOR_ADDRESS; under Slurm or Open "
        "MPI the coordinator alone is enough, JAX reads the rest from the launcher); "
        "only process 0 writes OUT.",
    )
    g.add_argument(
        "--devices",
        type=positive_int_or_all,
        default=1,
        help="devices of each process to train on, a number or 'all' (default: 1); "
        "--batch-size must be divisible by the devices of all processes together",
    )
    g.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        default=None,
        help="address of process 0, where the processes meet",
    )
    g.add_argument(
        "--num-processes",
        type=positive_int,
        default=None,
        help="number of processes",
    )
    g.add_argument(
        "--process-id",
        type=int,
        default=None,
        help="this process's number, from 0 to --num-processes - 1",
    )


def _start_processes(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """`jax.distributed.initialize`, before anything else touches JAX, when the flags
    or the environment ask for several processes."""
    given = (args.coordinator, args.num_processes, args.process_id)
    if given == (None, None, None) and "JAX_COORDINATOR_ADDRESS" not in os.environ:
        return
    if jax.distributed.is_initialized():
        return  # started by an earlier run in this process (as in the tests)
    try:
        jax.distributed.initialize(*given)
    except (ValueError, TypeError) as e:
        parser.error(
            f"cannot start several processes: {e} Pass --coordinator HOST:PORT, "
            "--num-processes and --process-id (under Slurm or Open MPI, --coordinator "
            "alone)."
        )


def _check_devices(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """`--devices` exist on this process and share `--batch-size` equally."""
    try:
        devices = training.data_parallel_mesh(args.devices).size
    except ValueError as e:
        parser.error(in_flags(str(e)).removeprefix("fit: "))
    if args.batch_size % devices:
        processes = jax.process_count()
        over = (
            f"{devices // processes} × {processes} processes" if processes > 1 else ""
        )
        parser.error(
            f"--batch-size {args.batch_size} cannot be split equally over "
            f"{devices} devices{f' ({over})' if over else ''}: pass a multiple of "
            f"{devices}, or fewer --devices."
        )
