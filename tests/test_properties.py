"""Property-based exactness: for random explicit Runge--Kutta tableaux, step counts,
constant and PID steps, save times at and between step ends, and a PyTree state,
`symplectic` and `backprop` give `diffrax.RecursiveCheckpointAdjoint()`'s solution and
gradients (w.r.t. y0, args and the field's parameters): to 1e-12 relative in float64,
and in float32 to float32 rounding (see `_assert_float32_rounding`).

A tableau is static (Diffrax and the adjoints read it as NumPy), so every example costs
one compile. An example therefore draws a *structure* (tableau, controller, which of
t0/t1/ts are saved and how many ts) and then several *value sets* (y0, parameters, args,
t0, t1, dt0 or tolerances, save times), all traced: one compile per structure, cached,
and reused by every value set and by any later example with the same structure.

CI runs the derandomised "ci" profile registered in `tests/conftest.py` (a few
examples). A long local run with many more, freshly random, examples:

    pytest tests/test_properties.py --hypothesis-profile=long
"""

import functools
from typing import NamedTuple

import diffrax
import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from helpers import assert_tree_allclose, scalar_loss
from hypothesis import event, given, settings

import neuralode

MAX_STEPS = 32
STATE_SHAPES = ((3,), (2, 2))
STATE_SIZES = [int(np.prod(shape)) for shape in STATE_SHAPES]
STATE_SIZE = sum(STATE_SIZES)
ADJOINTS = {
    "reference": diffrax.RecursiveCheckpointAdjoint(),
    "symplectic": neuralode.SymplecticAdjoint(),
    "backprop": neuralode.BackpropAdjoint(),
}


class Tableau(NamedTuple):
    """An explicit tableau as nested tuples (hashable: it keys the compile cache)."""

    a: tuple[tuple[float, ...], ...]  # full (s, s), strictly lower triangular
    b: tuple[float, ...]
    b_error: tuple[float, ...]
    c: tuple[float, ...]  # row sums of `a`, exactly 0 or 1 where a row was made so


@functools.lru_cache(maxsize=64)
def _solver(tableau: Tableau) -> diffrax.AbstractERK:
    """A user-defined `AbstractERK` with this tableau, as a user would write one."""
    a = np.array(tableau.a)
    butcher = diffrax.ButcherTableau(
        a_lower=tuple(a[i, :i] for i in range(1, len(tableau.b))),
        b_sol=np.array(tableau.b),
        b_error=np.array(tableau.b_error),
        c=np.array(tableau.c[1:]),
    )

    class DrawnERK(diffrax.AbstractERK):
        tableau = butcher
        # Hermite on the first and last stage: not accurate for most tableaux, but
        # deterministic, which is all the comparison needs.
        interpolation_cls = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

        def order(self, terms):
            return 1  # the weights sum to one; nothing more is guaranteed

    return DrawnERK()


class Structure(NamedTuple):
    """What decides the compiled function."""

    tableau: Tableau
    adaptive: bool
    save_t0: bool
    save_t1: bool
    num_ts: int


class Field(eqx.Module):
    """A time-dependent field on a state made of arrays of shapes `STATE_SHAPES`."""

    weight: jax.Array
    bias: jax.Array

    def __call__(self, t, y, args):
        z = jnp.concatenate([jnp.ravel(leaf) for leaf in y])
        out = args * jnp.tanh(self.weight @ z + t * self.bias)
        parts = jnp.split(out, np.cumsum(STATE_SIZES)[:-1])
        return tuple(
            jnp.reshape(p, shape) for p, shape in zip(parts, STATE_SHAPES, strict=True)
        )


class Values(NamedTuple):
    """One value set: every traced input of a compiled structure."""

    inputs: tuple  # (y0, args, field): what is differentiated
    t0: jax.Array
    t1: jax.Array
    dt0: jax.Array
    ts: jax.Array | None
    tol: jax.Array  # PID's rtol and atol; unused with constant steps


# --- Drawing ---------------------------------------------------------------------------

_generic_entry = st.floats(-1.0, -1e-3) | st.floats(1e-3, 1.0, exclude_max=True)
# Exact zeros and ones are what make stages unused or special.
_special_entry = st.one_of(_generic_entry, st.sampled_from([0.0, 1.0]))


def _summing_to(draw, entry, n: int, total: float) -> list[float]:
    """`n` entries whose sum is `total`: one drawn index takes what the others leave."""
    entries = draw(st.lists(entry, min_size=n, max_size=n))
    j = draw(st.integers(0, n - 1))
    entries[j] = total - (sum(entries) - entries[j])
    return entries


@st.composite
def tableaux(draw) -> Tableau:
    """Strictly lower-triangular `a` with random entries, random `b` summing to one,
    `c` the row sums. Edge cases drawn on purpose: entries and weights exactly 0 or 1
    (in half the tableaux), rows summing to exactly 0 or 1 (Diffrax evaluates a stage
    with c = 1 at t1 exactly), and first-same-as-last tableaux (last row of `a` equal
    to `b`, last weight zero)."""
    s = draw(st.integers(2, 5))
    entry = draw(st.sampled_from([_generic_entry, _special_entry]))
    fsal = draw(st.sampled_from([False, False, False, True]))
    a = np.zeros((s, s))
    c = np.zeros(s)
    for i in range(1, s):
        node = draw(st.sampled_from(["free", "free", "zero", "one"]))
        if node == "free":
            a[i, :i] = draw(st.lists(entry, min_size=i, max_size=i))
            c[i] = a[i, :i].sum()
        else:
            c[i] = 0.0 if node == "zero" else 1.0
            a[i, :i] = _summing_to(draw, entry, i, c[i])
    if fsal:
        b = np.array([*_summing_to(draw, entry, s - 1, 1.0), 0.0])
        a[-1, :-1], c[-1] = b[:-1], 1.0
    else:
        b = np.array(_summing_to(draw, entry, s, 1.0))
    b_error = np.array(draw(st.lists(entry, min_size=s, max_size=s)))
    b_error -= b_error.mean()  # Diffrax requires the error weights to sum to zero
    return Tableau(
        tuple(map(tuple, a.tolist())),
        tuple(b.tolist()),
        tuple(b_error.tolist()),
        tuple(c.tolist()),
    )


@st.composite
def structures(draw) -> Structure:
    num_ts = draw(st.integers(0, 3))
    save_t0 = draw(st.booleans())
    # Something after t0 is saved, so that every input gets a gradient.
    save_t1 = num_ts == 0 or draw(st.booleans())
    return Structure(draw(tableaux()), draw(st.booleans()), save_t0, save_t1, num_ts)


@st.composite
def value_sets(draw, structure: Structure, dtype) -> Values:
    """Times, step size or tolerances, save times, and (from a seed) y0, args and the
    field's parameters, all in `dtype`."""
    cast = np.dtype(dtype).type
    direction = draw(st.sampled_from([1, -1]))
    t0 = cast(draw(st.floats(-1.0, 1.0, allow_subnormal=False)))
    t1 = cast(t0 + direction * draw(st.floats(0.25, 2.0)))
    # Constant steps: `num_steps` steps, the last a drawn fraction of the others.
    num_steps = draw(st.integers(1, 12))
    last_fraction = draw(st.floats(0.01, 1.0))
    dt0 = (t1 - t0) / cast(num_steps - 1 + last_fraction)
    tol = cast(10.0 ** draw(st.floats(-3.0, -1.0)))
    # Save times in (t0, t1]: some at the end of a constant step, computed as Diffrax
    # computes it, the others anywhere; sorted, possibly repeated.
    steps_taken = np.ceil((t1 - t0) * direction / np.nextafter(dt0 * direction, np.inf))
    step_end = lambda k: t0 + (t1 - t0) * (cast(min(k, steps_taken)) / steps_taken)
    fraction = lambda u: t0 + (t1 - t0) * cast(u)
    ts = draw(
        st.lists(
            st.one_of(
                st.integers(1, num_steps).map(step_end),
                st.floats(0.0, 1.0, exclude_min=True, allow_subnormal=False).map(
                    fraction
                ),
            ),
            min_size=structure.num_ts,
            max_size=structure.num_ts,
        )
    )
    ts = np.array(sorted(ts, key=lambda t: direction * t), dtype=dtype)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
    field = Field(normal(STATE_SIZE, STATE_SIZE) * 0.5, normal(STATE_SIZE))
    y0 = tuple(normal(*shape) for shape in STATE_SHAPES)
    args = jnp.asarray(rng.uniform(0.5, 2.0), dtype)
    return Values(
        (y0, args, field),
        jnp.asarray(t0),
        jnp.asarray(t1),
        jnp.asarray(dt0),
        jnp.asarray(ts) if structure.num_ts else None,
        jnp.asarray(tol),
    )


@st.composite
def cases(draw, dtype):
    structure = draw(structures())
    # Runs are cheap beside the compile: several value sets per structure.
    values = draw(st.lists(value_sets(structure, dtype), min_size=3, max_size=8))
    return structure, values


# --- Solving ---------------------------------------------------------------------------


def _solve(structure, values, adjoint, controller, inputs=None, saveat=None):
    y0, args, field = values.inputs if inputs is None else inputs
    if saveat is None:
        saveat = diffrax.SaveAt(
            t0=structure.save_t0, t1=structure.save_t1, ts=values.ts
        )
    return diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        _solver(structure.tableau),
        values.t0,
        values.t1,
        values.dt0,
        y0,
        args=args,
        saveat=saveat,
        stepsize_controller=controller,
        adjoint=adjoint,
        max_steps=MAX_STEPS,
        throw=False,  # a solve that runs out of steps is compared as it stopped
    )


def _controller(structure, values):
    if structure.adaptive:
        return diffrax.PIDController(rtol=values.tol, atol=values.tol)
    return diffrax.ConstantStepSize()


def _loss(inputs, structure, values, adjoint, controller):
    ys = _solve(structure, values, adjoint, controller, inputs).ys
    # Slots after a solve stopped by max_steps hold inf.
    ys = jtu.tree_map(lambda y: jnp.where(jnp.isfinite(y), y, 0.0), ys)
    return scalar_loss(ys), ys


def _gradients(structure, values, controller, names):
    """{name: (solution, gradient)} for the adjoints `names`."""
    grad = eqx.filter_grad(_loss, has_aux=True)
    results = {}
    for name in names:
        args = (structure, values, ADJOINTS[name], controller)
        gradient, solution = grad(values.inputs, *args)
        results[name] = (solution, gradient)
    return results


# XLA's CPU executables hold about a thousand memory maps each until JAX's caches are
# cleared, and Linux allows a process 65530 by default: a long run that kept every drawn
# structure compiled aborts. So at most MAX_COMPILED are kept, then all are dropped.
MAX_COMPILED = 16
_compiled_by_key = {}


def _compile_once(build):
    """`build` once per arguments, forgotten (with JAX's caches) beyond MAX_COMPILED."""

    @functools.wraps(build)
    def cached(*args, **kwargs):
        key = (build.__name__, args, tuple(sorted(kwargs.items())))
        if key not in _compiled_by_key:
            if len(_compiled_by_key) >= MAX_COMPILED:
                _compiled_by_key.clear()
                jax.clear_caches()
            _compiled_by_key[key] = build(*args, **kwargs)
        return _compiled_by_key[key]

    return cached


@_compile_once
def _compiled(structure: Structure, with_step_ends: bool):
    """Solutions and gradients of every adjoint (and, if asked, the accepted steps' ends
    and whether the solve reached t1); compiled once per structure (and dtype, by jit)."""

    @eqx.filter_jit
    def run(values):
        controller = _controller(structure, values)
        results = _gradients(structure, values, controller, tuple(ADJOINTS))
        if not with_step_ends:
            return results, None, None
        steps = diffrax.SaveAt(steps=True)
        forward = ADJOINTS["reference"]
        sol = _solve(structure, values, forward, controller, saveat=steps)
        return results, sol.ts, sol.result == diffrax.RESULTS.successful

    return run


class StepEnds(diffrax.AbstractStepSizeController):
    """Steps to the given ends (padded with t1): replays the accepted steps of a float32
    solve in float64."""

    ends: jax.Array

    def wrap(self, direction):
        return StepEnds(self.ends * direction)

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        return self.ends[0], jnp.array(1)

    def adapt_step_size(self, t0, t1, y0, y1, args, y_error, error_order, i):
        return True, t1, self.ends[i], False, i + 1, diffrax.RESULTS.successful


@_compile_once
def _compiled_reference(structure: Structure):
    """The reference gradient on given step ends (the controller does not matter)."""

    @eqx.filter_jit
    def run(values, step_ends):
        step_ends = jnp.where(jnp.isfinite(step_ends), step_ends, values.t1)
        return _gradients(structure, values, StepEnds(step_ends), ("reference",))

    return run


# --- Checking --------------------------------------------------------------------------


def _relative_errors(actual, expected) -> np.ndarray:
    """Per leaf: the largest error relative to the leaf's largest entry."""
    errors = []
    for a, e in zip(jtu.tree_leaves(actual), jtu.tree_leaves(expected), strict=True):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        errors.append(np.max(np.abs(a - e)) / max(np.max(np.abs(e)), 1e-300))
    return np.array(errors)


# Criterion in float32. The float64 reference is the exact discrete gradient of the
# float32 solve's own steps (`StepEnds`), so what separates a float32 result from it is
# rounding alone. Exact strategies round differently (the same sums in other orders; the
# symplectic adjoint recomputes the stages and accumulates the cotangents stage by
# stage), so their errors differ but are of one size: the problem's conditioning times
# float32's epsilon. So a strategy passes if, leaf by leaf, its error is at most FACTOR
# times that of the float32 gradients it is measured against (Diffrax's
# `RecursiveCheckpointAdjoint`, and for `symplectic` also `backprop`, which takes
# Diffrax's own steps), plus ULPS epsilons for a leaf those happen to round almost
# exactly (a scalar gradient, a short solve). A wrong formula shows in float64, at
# 1e-12; this catches what only float32 shows: a quantity computed in the wrong
# precision, a cast missing or misplaced.
FACTOR = 4.0
ULPS = 8
FLOAT32_EPS = float(np.finfo(np.float32).eps)
MEASURED_AGAINST = {"symplectic": ("reference", "backprop"), "backprop": ("reference",)}


def _assert_float32_rounding(results, reference):
    errors = {
        name: _relative_errors(result, reference) for name, result in results.items()
    }
    for name, baselines in MEASURED_AGAINST.items():
        baseline = np.max([errors[b] for b in baselines], axis=0)
        bound = FACTOR * baseline + ULPS * FLOAT32_EPS
        assert np.all(errors[name] <= bound), (name, errors[name], bound)


@given(cases(np.float64))
def test_float64_matches_reference(case):
    structure, value_list = case
    run = _compiled(structure, with_step_ends=False)
    for values in value_list:
        results, _, _ = run(values)
        reference = results.pop("reference")
        y0_grad = reference[1][0]
        assert all(jnp.any(g != 0) for g in y0_grad)  # not a vacuous comparison
        for result in results.values():
            assert_tree_allclose(result, reference, 1e-12)


# A float32 example compiles twice (the float32 strategies, then the float64 reference
# on their steps): half as many examples as the profile asks for.
@settings(max_examples=max(1, settings.default.max_examples // 2))
@given(cases(np.float32))
def test_float32_within_rounding(case):
    structure, value_list = case
    run = _compiled(structure, with_step_ends=True)
    # The reference follows given step ends: the controller drawn does not matter.
    run_reference = _compiled_reference(structure._replace(adaptive=False))
    for values in value_list:
        results, step_ends, reached_t1 = run(values)
        if not reached_t1:
            # Stopped by max_steps after rejected steps, which the ends do not record:
            # the replay would not stop there. (Compared in float64.)
            event("float32: stopped by max_steps, not compared")
            continue
        values64 = jtu.tree_map(lambda x: jnp.asarray(x, jnp.float64), values)
        ends64 = jnp.asarray(step_ends, jnp.float64)
        reference = run_reference(values64, ends64)["reference"]
        _assert_float32_rounding(results, reference)
