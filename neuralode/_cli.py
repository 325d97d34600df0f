"""Command-line options the example scripts share: the gradient strategy, the solver and
its step control, and the training loop's settings, with clear errors for bad values."""

import argparse
import contextlib
import sys

import diffrax

from ._train import CheckpointError, TrainingDiverged
from .adjoints import ADJOINT_NAMES, get_adjoint

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

# Flags that change neither the model nor the data nor the optimisation, so a run may be
# resumed with other values of them.
_NOT_CONFIG = ("niters", "out", "resume", "checkpoint_every", "no_progress")


def positive_int(text: str) -> int:
    """`argparse` type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """`argparse` type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive number, got {text!r}"
        ) from None
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(
            f"expected a positive number, got {text!r}"
        ) from None
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
    `neuralode.SOLVERS`), `--steps N` (constant steps: N per solve) or `--rtol`/`--atol`
    (adaptive steps, `--max-steps` bounding them), `--niters`, `--batch-size`, `--lr`,
    `--seed`, `--out`, `--resume`, `--checkpoint-every`, `--no-progress`. Parse with
    `neuralode.parse_training_args`, which checks the combinations.
    """
    g = parser.add_argument_group("training")
    g.add_argument(
        "--adjoint",
        choices=ADJOINT_NAMES,
        default=adjoint,
        help=f"gradient strategy (default: {adjoint})",
    )
    g.add_argument(
        "--solver",
        choices=tuple(SOLVERS),
        default=solver,
        help=f"explicit Runge-Kutta solver (default: {solver})",
    )
    g.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help=f"constant step size: N steps per solve (default: {steps} "
        "unless --rtol/--atol are given)",
    )
    g.add_argument(
        "--rtol",
        type=positive_float,
        default=None,
        help="adaptive steps (PID controller) with this relative tolerance; "
        "--atol defaults to it",
    )
    g.add_argument(
        "--atol",
        type=positive_float,
        default=None,
        help="adaptive steps with this absolute tolerance; --rtol defaults to it",
    )
    g.add_argument(
        "--max-steps",
        type=positive_int,
        default=max_steps,
        help=f"bound on adaptive steps per solve (default: {max_steps}); "
        "the memory of backprop and symplectic grows with it",
    )
    g.add_argument(
        "--niters",
        type=positive_int,
        default=niters,
        help=f"training iterations, in total (default: {niters})",
    )
    g.add_argument(
        "--batch-size",
        type=positive_int,
        default=batch_size,
        help=f"minibatch size (default: {batch_size})",
    )
    g.add_argument(
        "--lr",
        type=positive_float,
        default=lr,
        help=f"Adam learning rate (default: {lr})",
    )
    g.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    g.add_argument("--out", default=out, help=f"output directory (default: {out})")
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoint.eqx (same options needed)",
    )
    g.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=checkpoint_every,
        help=f"checkpoint every N iterations (default: {checkpoint_every})",
    )
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(_default_steps=steps)
    return parser


def parse_training_args(
    parser: argparse.ArgumentParser, argv: list[str] | None = None
) -> argparse.Namespace:
    """Parse `argv` and check the combinations `add_training_arguments` allows:
    `--steps`
    excludes `--rtol`/`--atol`. Fills in the defaults of the step control."""
    args = parser.parse_args(argv)
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
    if adaptive:
        args.rtol = args.atol if args.rtol is None else args.rtol
        args.atol = args.rtol if args.atol is None else args.atol
    elif args.steps is None:
        args.steps = args._default_steps
    del args._default_steps
    return args


def solver_from_name(name: str) -> diffrax.AbstractSolver:
    """The Diffrax solver called `name`, one of `neuralode.SOLVERS`."""
    try:
        return SOLVERS[name]()
    except KeyError:
        raise ValueError(
            f"Unknown solver {name!r}; valid names are {list(SOLVERS)}."
        ) from None


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


def adjoint_from_args(args: argparse.Namespace) -> diffrax.AbstractAdjoint:
    """The gradient strategy `neuralode.get_adjoint(args.adjoint)`."""
    return get_adjoint(args.adjoint)


def run_config(args: argparse.Namespace) -> dict:
    """The options that must match for `--resume`: all but `--niters`, `--out`,
    `--resume`, `--checkpoint-every` and `--no-progress`."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in _NOT_CONFIG}


@contextlib.contextmanager
def exit_on_training_error():
    """Turn `neuralode.CheckpointError` and `neuralode.TrainingDiverged` into a one-line
    message on stderr and `SystemExit(1)`, as a command-line script should."""
    try:
        yield
    except (CheckpointError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from e
