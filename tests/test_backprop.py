"""`BackpropAdjoint` beyond exactness (compared with Diffrax in test_exactness.py): its
arithmetic follows the steps taken, its storage estimate and warning, the FSAL state it
takes and gives back, and a field that jumps."""

import warnings

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from helpers import assert_tree_allclose, scalar_loss, small_problem, solve

import neuralode
import neuralode.measure
from neuralode.adjoints import _backprop

# A 3-step adaptive solve of a small field (batch 8, state 4, width 16).
FIELD = neuralode.MLPField(4, 16, 2, key=jax.random.PRNGKey(0))
Y0 = jax.random.normal(jax.random.PRNGKey(1), (8, 4))


def _gradient(max_steps, field=FIELD):
    def loss(field, y0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            diffrax.Tsit5(),
            0.0,
            1.0,
            0.1,
            y0,
            stepsize_controller=diffrax.PIDController(rtol=1e-8, atol=1e-8),
            adjoint=neuralode.BackpropAdjoint(),
            max_steps=max_steps,
        )
        return jnp.sum(sol.ys**2), sol.stats["num_steps"]

    return eqx.filter_jit(eqx.filter_grad(loss, has_aux=True))


def test_backprop_arithmetic_follows_the_steps_taken():
    # Evaluations of f executed by the gradient (the forward sweep; the reverse sweep
    # has no callbacks): the same with max_steps = 4k as with 64k, for k steps taken.
    counter = neuralode.measure.EvaluationCounter()
    counted = counter.wrap(FIELD)
    counts = {}
    for max_steps in (12, 192):
        counter.reset()
        _, steps = jax.block_until_ready(_gradient(max_steps)(counted, Y0))
        counts[max_steps] = counter.count
        assert steps == 3
    assert counts[12] == counts[192], counts
    # At most the first block of 4 steps of 6 new stages, and f(t0, y0) once.
    assert counts[192] <= 4 * 6 + 1, counts


def test_backprop_estimates_its_storage_and_warns_when_large(monkeypatch):
    estimates = []
    estimate = _backprop._stored_bytes_per_step
    recorded = lambda *args: estimates.append(estimate(*args)) or estimates[-1]
    monkeypatch.setattr(_backprop, "_stored_bytes_per_step", recorded)
    # Traced only (nothing compiled). Diffrax's solve is jitted: the warning comes once
    # per configuration, when it is traced.
    traced = lambda n: eqx.filter_eval_shape(_gradient(n), FIELD, Y0)

    monkeypatch.setattr(_backprop, "_memory_bytes", lambda: 2**40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        traced(64)
    per_step = estimates[-1]
    monkeypatch.setattr(_backprop, "_memory_bytes", lambda: 64 * per_step)
    with pytest.warns(UserWarning, match=r"max_steps=65 allocates about"):
        traced(65)  # 65 steps of storage: above a quarter of 64 steps' worth
    # The estimate against XLA's own figure: temp bytes grow by about it per step.
    monkeypatch.setattr(_backprop, "_memory_bytes", lambda: 2**40)
    params, static = eqx.partition(FIELD, eqx.is_array)
    temp = {
        n: neuralode.measure.xla_temp_bytes(
            lambda p, y, n=n: _gradient(n)(eqx.combine(p, static), y), params, Y0
        )
        for n in (64, 128)
    }
    growth = (temp[128] - temp[64]) / 64
    assert 0.7 * growth <= per_step <= 1.3 * growth, (per_step, growth)


PID = diffrax.PIDController(rtol=1e-4, atol=1e-6)


def _against_diffrax(loss, inp, *extra):
    """`loss(inp, adjoint, *extra)` (value, aux) under Diffrax's adjoint and backprop,
    each for every `extra`, in one compile."""

    @eqx.filter_jit
    def run(inp):
        return [
            [
                eqx.filter_grad(loss, has_aux=True)(inp, adjoint, e)
                for adjoint in (
                    diffrax.RecursiveCheckpointAdjoint(),
                    neuralode.BackpropAdjoint(),
                )
            ]
            for e in extra
        ]

    return run(inp)


def test_fsal_state_taken_and_given_back(getkey):
    # A fresh FSAL state (first_step true) makes backprop evaluate f(t0, y0) before the
    # loop; a state that holds its f is used as given. Diffrax's state comes back.
    y0, args, field = inp = small_problem(getkey())
    fresh = (jnp.array(True), jnp.zeros_like(y0))
    held = (jnp.array(False), 0.3 * field(0.0, y0))

    def loss(inp, adjoint, state):
        y0, args, field = inp
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, a: a * field(t, y)),
            diffrax.Tsit5(),
            0.0,
            1.0,
            0.05,
            y0,
            args=args,
            solver_state=state,
            saveat=diffrax.SaveAt(ts=jnp.array([0.3, 1.0]), solver_state=True),
            stepsize_controller=PID,
            adjoint=adjoint,
            max_steps=64,
        )
        return scalar_loss(sol.ys), sol.solver_state

    for (ref_grad, ref_state), (grad, state) in _against_diffrax(
        loss, inp, fresh, held
    ):
        assert_tree_allclose(grad, ref_grad, 1e-12)
        assert state[0] == ref_state[0] == jnp.array(False)
        assert_tree_allclose(state[1], ref_state[1], 1e-12)


def test_field_that_jumps(getkey):
    # After a jump the FSAL value is evaluated again (a cond in the step).
    jumps = jnp.array([0.5, 0.6])
    controller = diffrax.ClipStepSizeController(PID, jump_ts=jumps)

    def loss(inp, adjoint, _):
        y0, args, field = inp
        sign = lambda t: jnp.where((t < jumps[0]) | (t > jumps[1]), 1.0, -1.0)
        jumping = (y0, args, lambda t, y: sign(t) * field(t, y))
        ys = solve(
            jumping,
            adjoint=adjoint,
            solver=diffrax.Tsit5(),
            controller=controller,
            saveat=diffrax.SaveAt(ts=jnp.array([0.2, 0.55, 1.0])),
        ).ys
        return scalar_loss(ys), ys

    [((ref_grad, ref_ys), (grad, ys))] = _against_diffrax(
        loss, small_problem(getkey()), None
    )
    assert_tree_allclose(ys, ref_ys, 1e-12)
    assert_tree_allclose(grad, ref_grad, 1e-12)
