"""Discretise-then-optimise with every intermediate kept: plain backpropagation.

Reverse mode runs through Diffrax's own solve loop and stores the activations of every
evaluation of f_θ: memory O(M·s·m·d) for `max_steps` = M, s stages, m layers of width d.
Nothing is recomputed, so it does the least arithmetic of the exact strategies: one
forward and one reverse sweep of each evaluation of f.

Two choices keep its time close to that of a plain `lax.scan` over the steps:

- The stages of an explicit Runge--Kutta step are taken in straight-line code (the
  arithmetic of Diffrax's step, stage by stage). Diffrax's stage loop, a scan with a
  `lax.cond` per stage, would make reverse mode store a copy of the weights of f for
  every stage of every step and route each stage's activations through the cond.
- The steps run in blocks of 4, 12, 48, ... steps (each 3× the steps before it). The
  first block is a plain `lax.scan`; every later block is one `lax.scan` inside a
  `lax.cond` that skips it once the solve has finished. A solve of k steps therefore
  does the arithmetic of at most max(4, 4k) steps, whatever `max_steps` is, while the
  steps it takes are plain scan iterations (a cond per step, or a scan over equal blocks
  each under a cond, would copy every stored activation once more). The cond's predicate
  is taken over the whole batch under `jax.vmap`, so it stays a cond; finished members
  are masked inside a block, as in `equinox.internal.while_loop`.

XLA's shapes are static, so the storage for all M steps is allocated and written (with
zeros where no step was taken) whether the steps are taken or not: size `max_steps` a
little above the number of steps the solve takes (`sol.stats["num_steps"]`).
"""

import functools
import operator
import os
import typing
import warnings

import diffrax
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.extend.core as jex
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.core import ShapedArray

from . import _diffrax_private as private
from ._input_checks import checked_inputs

_FIRST_BLOCK = 4
_GROWTH = 4  # each block after the first holds (_GROWTH - 1) × the steps before it
# Warn when the stored steps would take more than this fraction of the device's memory.
_WARN_FRACTION = 0.25


def _is_none(x):
    return x is None


class BackpropAdjoint(diffrax.AbstractAdjoint):
    """Backpropagate through every step of the solve, storing every intermediate value.

    Exact for the discretisation (the same solution and gradient as
    `diffrax.RecursiveCheckpointAdjoint`, to rounding), with no recomputation, at memory
    O(max_steps·s·m·d). It also supports forward mode (`jax.jvp`) and higher derivatives.

    Requires a finite `diffeqsolve(..., max_steps=...)`: storage for that many steps is
    allocated whether they are taken or not, so set it a little above the number of steps
    the solve takes (`sol.stats["num_steps"]` of a trial solve). The arithmetic follows
    the steps taken: a solve of k steps evaluates f for at most max(4, 4k) steps, whatever
    `max_steps` is; the time to allocate and write the storage does follow `max_steps`.
    A warning is raised at trace time when the estimated storage exceeds a quarter of the
    device's memory (of the host's, on a CPU): max_steps × the bytes of one step's
    linearisation that are not its inputs, per vmapped member (within 30% of XLA's own
    figure in the tests).
    """

    def loop(
        self,
        *,
        solver,
        max_steps,
        throw,
        passed_solver_state,
        passed_controller_state,
        init_state,
        terms,
        args,
        **kwargs,
    ):
        del passed_solver_state, passed_controller_state
        init_state = checked_inputs(init_state, terms, args, kwargs["t0"], throw)
        if max_steps is None:
            raise ValueError(
                "BackpropAdjoint needs `diffeqsolve(..., max_steps=<int>)`: it stores "
                "every step, so it must know how many to allocate. Pass max_steps, or use "
                "neuralode.SymplecticAdjoint / diffrax.RecursiveCheckpointAdjoint."
            )
        first_step = None
        if _is_plain_erk(solver):
            solver = _StraightLineERK(solver)
            first_step, init_state = _fsal_input(init_state, terms, args)
        else:
            solver = _stages_kept(solver)
        _warn_if_large(solver, terms, args, init_state, max_steps)
        final_state, aux_stats = private.loop(
            solver=solver,
            max_steps=max_steps,
            init_state=init_state,
            terms=terms,
            args=args,
            inner_while_loop=_single_scan,
            outer_while_loop=_skipping_loop,
            **kwargs,
        )
        if first_step is not None:
            final_state = _fsal_output(final_state, first_step)
        return final_state, aux_stats


def _single_scan(cond_fun, body_fun, init_val, *, max_steps, buffers, checkpoints=None):
    # A bounded loop whose base is its length: one `lax.scan`, no checkpoints. Used for
    # the saves at `SaveAt(ts)` inside a step.
    del checkpoints
    return eqxi.while_loop(
        cond_fun,
        body_fun,
        init_val,
        max_steps=max_steps,
        buffers=buffers,
        kind="bounded",
        base=max(max_steps, 2),
    )


def _block_sizes(max_steps: int) -> list[int]:
    """4, 12, 48, ... steps (the last one cut at `max_steps`)."""
    sizes = [min(_FIRST_BLOCK, max_steps)]
    while sum(sizes) < max_steps:
        sizes.append(min((_GROWTH - 1) * sum(sizes), max_steps - sum(sizes)))
    return sizes


def _skipping_loop(
    cond_fun, body_fun, init_val, *, max_steps, buffers, checkpoints=None
):
    """A reverse-differentiable while loop of at most `max_steps` iterations, as
    `equinox.internal.while_loop(kind="bounded")`, whose blocks after the first are
    skipped once `cond_fun` is false for every batch member."""
    del checkpoints
    # Steps are counted, finished members masked and buffers written in place as in
    # Equinox's bounded loop.
    cond_fun, body_fun, val, _ = private.common_rewrite(
        cond_fun, body_fun, init_val, max_steps, buffers, makes_false_steps=True
    )

    def run(val, length):
        return lax.scan(lambda v, _: (body_fun(v), None), val, length=length)[0]

    first, *later = _block_sizes(max_steps)
    val = run(val, first)
    for length in later:
        val = lax.cond(
            cond_fun(val), functools.partial(run, length=length), lambda v: v, val
        )
    return val[-1]


def _is_plain_erk(solver: diffrax.AbstractSolver) -> bool:
    """Whether `solver` takes Diffrax's explicit Runge--Kutta steps with one Butcher
    tableau. The concrete type is checked: a wrapper such as `diffrax.HalfSolver` passes
    `isinstance(..., AbstractERK)`, and a subclass may override the step."""
    solver_type = type(solver)
    return (
        issubclass(solver_type, diffrax.AbstractERK)
        and isinstance(solver_type.tableau, diffrax.ButcherTableau)
        and not solver_type.tableau.implicit
        and all(
            getattr(solver_type, name) is getattr(diffrax.AbstractRungeKutta, name)
            for name in ("init", "step", "func")
        )
    )


def _stages_kept(solver: diffrax.AbstractSolver) -> diffrax.AbstractSolver:
    """`solver` with its loop over the stages un-checkpointed, so that every stage's
    activations are kept (and forward mode sees no custom VJP), also inside wrappers
    such as `diffrax.HalfSolver`."""
    if isinstance(solver, diffrax.AbstractWrappedSolver):
        return eqx.tree_at(lambda s: s.solver, solver, _stages_kept(solver.solver))
    kind = None
    if isinstance(solver, diffrax.AbstractRungeKutta):
        kind = "bounded"
    elif isinstance(solver, diffrax.AbstractSRK):
        kind = "lax"  # its only un-checkpointed scan
    if kind is None or getattr(solver, "scan_kind", None) is not None:
        return solver
    return eqx.tree_at(lambda s: s.scan_kind, solver, kind, is_leaf=_is_none)


def _combination(weights, ks):
    """Σ_j weights[j]·ks[j] over the nonzero weights, leaf by leaf (zeros if none)."""
    pairs = [(float(w), k) for w, k in zip(weights, ks, strict=True) if w != 0]
    if not pairs:
        return jtu.tree_map(jnp.zeros_like, ks[0])

    def leaf(*k_leaves):
        products = (w * k for (w, _), k in zip(pairs, k_leaves, strict=True))
        return functools.reduce(operator.add, products)

    return jtu.tree_map(leaf, *(k for _, k in pairs))


def _plus(y, increment):
    return jtu.tree_map(operator.add, y, increment)


class _StraightLineERK(diffrax.AbstractWrappedSolver):
    """An explicit RK solver's step with its stages in straight-line code.

    The arithmetic is Diffrax's: k_i = F(t_0 + c_i h, y_0 + Σ_{j<i} a_ij k_j), where F is
    `terms.vf_prod` (or `terms.prod` of `terms.vf` for an FSAL tableau, whose last f
    starts the next step), y_1 = y_0 + Σ b_i k_i, error Σ b^err_i k_i, and dense output
    from the stacked k. The FSAL state is f(t_0, y_0) of the coming step, valid from the
    first step on (see `_fsal_input`), so no step needs a cond to evaluate it, except
    after a jump of the field.
    """

    # As Diffrax's own wrapped solvers: a field and a property where the base classes
    # declare abstract variables.
    solver: diffrax.AbstractERK  # pyright: ignore[reportIncompatibleVariableOverride]

    @property
    def term_structure(self):  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.solver.term_structure

    @property
    def interpolation_cls(self):  # pyright: ignore
        return self.solver.interpolation_cls

    def order(self, terms):
        return self.solver.order(terms)

    def error_order(self, terms):
        return self.solver.error_order(terms)

    def func(self, terms, t0, y0, args):
        return self.solver.func(terms, t0, y0, args)

    def init(self, terms, t0, t1, y0, args):
        state = self.solver.init(terms, t0, t1, y0, args)
        return None if state is None else self.func(terms, t0, y0, args)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        tableau = typing.cast(diffrax.ButcherTableau, self.solver.tableau)
        control = terms.contr(t0, t1)
        time_dtype = jnp.result_type(t0, t1)

        def stage(c_i, y_i):
            c_i = jnp.asarray(c_i, time_dtype)
            t_i = jnp.where(c_i == 1, t1, t0 + c_i * (t1 - t0))
            if solver_state is None:
                return None, terms.vf_prod(t_i, y_i, args, control)
            f_i = terms.vf(t_i, y_i, args)
            return f_i, terms.prod(f_i, control)

        if solver_state is None:
            f_i, k_0 = stage(tableau.c1, y0)
        else:
            f_i = solver_state
            if made_jump is not False:  # the field may differ at this step's start
                f_i = lax.cond(
                    eqxi.unvmap_any(made_jump),
                    lambda: terms.vf(t0, y0, args),
                    lambda: f_i,
                )
            k_0 = terms.prod(f_i, control)
        ks = [k_0]
        y_i = y0
        for c_i, a_i in zip(tableau.c, tableau.a_lower, strict=True):
            y_i = _plus(y0, _combination(a_i, ks))
            f_i, k_i = stage(c_i, y_i)
            ks.append(k_i)
        y1 = y_i if tableau.ssal else _plus(y0, _combination(tableau.b_sol, ks))
        y_error = _combination(tableau.b_error, ks)
        dense_info = dict(y0=y0, y1=y1, k=jtu.tree_map(lambda *k: jnp.stack(k), *ks))
        return y1, y_error, dense_info, f_i, diffrax.RESULTS.successful


def _fsal_input(init_state, terms, args):
    """Diffrax's FSAL state (first_step, f) as f(t0, y0), evaluated once here where the
    state does not hold it yet (a fresh solve), so that no step evaluates it. Returns
    first_step too (`None` without FSAL)."""
    if init_state.solver_state is None:
        return None, init_state
    first_step, f0 = init_state.solver_state
    stale = jnp.logical_or(first_step, init_state.made_jump)
    f0 = lax.cond(
        eqxi.unvmap_any(stale),
        lambda: terms.vf(init_state.tprev, init_state.y, args),
        lambda: f0,
    )
    return first_step, eqx.tree_at(lambda s: s.solver_state, init_state, f0)


def _fsal_output(final_state, first_step):
    """Back to Diffrax's FSAL state: first_step holds until a step is accepted."""
    first_step = jnp.logical_and(first_step, final_state.num_accepted_steps == 0)
    state = (first_step, final_state.solver_state)
    return eqx.tree_at(lambda s: s.solver_state, final_state, state)


def _memory_bytes() -> int | None:
    """The default device's memory, or the host's on a CPU (`None` if unknown)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def _stored_bytes_per_step(solver, terms, args, state) -> int:
    """Bytes reverse mode keeps for one step: the residuals of the linearisation of
    `solver.step` in the state and in the float arrays it closes over (the field's
    weights, `args`), less those that are inputs (kept once, not per step). Where a
    closed-over array refuses a tangent (a Brownian path's times), in the state only."""

    def step(y):
        return solver.step(
            terms,
            state.tprev,
            state.tnext,
            y,
            args,
            state.solver_state,
            state.made_jump,
        )[:4]

    def residual_bytes(fn, *inputs):
        linear = jax.make_jaxpr(lambda *x: jax.linearize(fn, *x)[1])(*inputs)
        known = set(linear.jaxpr.invars) | set(linear.jaxpr.constvars)
        avals = [
            typing.cast(ShapedArray, v.aval)
            for v in linear.jaxpr.outvars
            if isinstance(v, jex.Var) and v not in known
        ]
        return sum(aval.size * aval.dtype.itemsize for aval in avals)

    converted, consts = jax.closure_convert(step, state.y)
    try:
        return residual_bytes(converted, state.y, *consts)
    except Exception:  # an estimate for a warning must not stop the solve
        return residual_bytes(step, state.y)


def _warn_if_large(solver, terms, args, state, max_steps):
    memory = _memory_bytes()
    if memory is None:
        return
    per_step = _stored_bytes_per_step(solver, terms, args, state)
    stored = max_steps * per_step
    if stored > _WARN_FRACTION * memory:
        warnings.warn(
            f"BackpropAdjoint: max_steps={max_steps} allocates about "
            f"{stored / 2**30:.1f} GiB ({per_step / 2**20:.2f} MiB per step), more "
            f"than a quarter of the device's {memory / 2**30:.0f} GiB: every step up to "
            "max_steps is stored, whether it is taken or not. Set max_steps a little "
            "above the number of steps the solve takes (sol.stats['num_steps']), or use "
            "neuralode.SymplecticAdjoint or diffrax.RecursiveCheckpointAdjoint.",
            stacklevel=2,
        )
