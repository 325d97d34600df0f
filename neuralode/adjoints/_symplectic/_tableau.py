"""One explicit Runge--Kutta step, recomputed and pulled back stage by stage.

With tableau (A strictly lower triangular, b, c) and the vector field-control product
F_i(Y) = term.vf_prod(t_n + c_i h, Y, args, control), Diffrax's step is

    Y_i = y_n + Σ_{j<i} a_ij k_j,   k_i = F_i(Y_i),   y_{n+1} = y_n + Σ_i b_i k_i

(its `k` already contains the control, i.e. h·f for an ODE). Given λ = ∂L/∂y_{n+1} and
cotangents on the stages from dense output, reverse mode visits the stages last to first:

    k̄_i = b_i λ + k̄_i(dense) + Σ_{j>i} a_ji Ȳ_j,     (Ȳ_i, θ̄_i) = VJP of F_i at Y_i on k̄_i,
    ∂L/∂y_n = λ + Σ_i Ȳ_i,     ∂L/∂θ = Σ_i θ̄_i.

This is the symplectic partitioned Runge--Kutta adjoint of Matsubara et al. written
without the division by b_i, so stages with b_i = 0 need no special case. Both loops are
`lax.fori_loop`s over the stages so that only one evaluation of f has live activations.
"""

from collections.abc import Callable
from typing import NamedTuple

import diffrax
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np


class ExplicitTableau(NamedTuple):
    """Full (s, s) matrix `a`, weights `b` and nodes `c` (with c_1 = 0), as NumPy."""

    a: np.ndarray
    b: np.ndarray
    c: np.ndarray

    @property
    def num_stages(self) -> int:
        return len(self.b)

    def stages_for_solution(self) -> int:
        """How many leading stages y_{n+1} depends on. A trailing stage with b_i = 0 that
        no later stage uses (FSAL: only for the error estimate) is not needed."""
        used = (self.b != 0) | (np.abs(self.a).sum(axis=0) != 0)
        return int(np.max(np.nonzero(used)[0])) + 1


def explicit_tableau(solver: diffrax.AbstractSolver) -> ExplicitTableau | None:
    """The tableau of an explicit RK solver, or `None` if `solver` is not one.

    The concrete type is checked: wrappers such as `diffrax.HalfSolver` pass an
    `isinstance(..., AbstractERK)` check but do not take plain RK steps, and neither
    does a subclass that overrides how a step is taken.
    """
    solver_type = type(solver)
    if solver_type is diffrax.Euler:
        return ExplicitTableau(np.zeros((1, 1)), np.ones(1), np.zeros(1))
    if not issubclass(solver_type, diffrax.AbstractERK):
        return None
    if any(
        getattr(solver_type, name) is not getattr(diffrax.AbstractRungeKutta, name)
        for name in ("init", "func", "step")
    ):
        return None
    tableau = getattr(solver_type, "tableau", None)
    if not isinstance(tableau, diffrax.ButcherTableau) or tableau.implicit:
        return None
    s = tableau.num_stages
    a = np.zeros((s, s))
    for i, row in enumerate(tableau.a_lower, start=1):
        a[i, : len(row)] = row
    c = np.concatenate([[0.0], tableau.c])
    return ExplicitTableau(a, np.asarray(tableau.b_sol, dtype=float), c)


def _stage_time(c_i, t0, t1):
    # As Diffrax: exactly t1 when c_i == 1, so FSAL stages see the same time.
    return jnp.where(c_i == 1, t1, t0 + c_i * (t1 - t0))


def _stage_input(a_i, y0, ks):
    return jtu.tree_map(
        lambda y, k: y + jnp.tensordot(a_i.astype(k.dtype), k, axes=1), y0, ks
    )


def step_end(tableau: ExplicitTableau, y0, ks):
    """y_{n+1} = y_n + Σ_i b_i k_i, from the stages `ks` (the leading ones, as
    `recompute_stages` gives them: those left out have b_i = 0)."""
    num_stages = jtu.tree_leaves(ks)[0].shape[0]
    return _stage_input(jnp.asarray(tableau.b[:num_stages]), y0, ks)


def outer_weights(w, x):
    """w_j · x for each weight: shape `(len(w), *x.shape)`, with explicit ranks (clean
    under `jax_numpy_rank_promotion="raise"`)."""
    w = w.astype(x.dtype).reshape(w.shape + (1,) * x.ndim)
    return w * x[None]


def recompute_stages(
    tableau: ExplicitTableau,
    num_stages: int,
    vf_prod: Callable,
    t0,
    t1,
    y0,
    *,
    num_computed: int | jax.Array | None = None,
):
    """The increments k_1..k_{num_stages} of the step from (t0, y0) to t1, as a PyTree
    of `(num_stages, *leaf.shape)` buffers. Nothing is kept for differentiation.

    Only the first `num_computed` (default: all; may be traced) are evaluated, the rest
    left zero: the pullback needs k_j only to form later stage inputs, so never the last
    one's."""
    a = jnp.asarray(tableau.a[:num_stages, :num_stages])
    c = jnp.asarray(tableau.c[:num_stages], dtype=jnp.result_type(t0))
    ks = jtu.tree_map(lambda y: jnp.zeros((num_stages, *y.shape), y.dtype), y0)

    def body(i, ks):
        y_i = _stage_input(a[i], y0, ks)
        k_i = vf_prod(_stage_time(c[i], t0, t1), y_i)
        return jtu.tree_map(lambda buf, k: buf.at[i].set(k), ks, k_i)

    return lax.fori_loop(
        0, num_stages if num_computed is None else num_computed, body, ks
    )


def unrolled_stages(
    tableau: ExplicitTableau, num_stages: int, vf_prod: Callable, t0, t1, y0
):
    """The increments k_1..k_{num_stages}, as `recompute_stages` gives them, in
    straight-line code: to differentiate the whole step at once (every stage's
    activations kept)."""
    c = jnp.asarray(tableau.c, jnp.result_type(t0))
    ks = []
    for i in range(num_stages):
        y_i = y0
        for j in range(i):
            if tableau.a[i, j] != 0:
                a_ij = tableau.a[i, j]
                y_i = jtu.tree_map(
                    lambda y, k, a=a_ij: y + jnp.asarray(a, k.dtype) * k, y_i, ks[j]
                )
        ks.append(vf_prod(_stage_time(c[i], t0, t1), y_i))
    return jtu.tree_map(lambda *k: jnp.stack(k), *ks)


def pullback_stages(
    tableau: ExplicitTableau,
    num_stages: int,
    vf_prod_vjp: Callable,
    t0,
    t1,
    y0,
    ks,
    k_bar,
    params_bar,
    *,
    num_pulled=None,
):
    """Reverse mode through the stages, last to first.

    `k_bar` holds the cotangents already on each k_i (b_i λ plus dense output);
    `vf_prod_vjp(t, y, cotangent) -> (y_bar, params_bar)` is one VJP of F at (t, y).
    Only the first `num_pulled` stages (default: all; may be traced) are visited: the
    rest carry no cotangent. Returns Σ_i Ȳ_i and the accumulated parameter cotangent.
    """
    num_pulled = num_stages if num_pulled is None else num_pulled
    a = jnp.asarray(tableau.a[:num_stages, :num_stages])
    c = jnp.asarray(tableau.c[:num_stages], dtype=jnp.result_type(t0))
    y_bar_sum = jtu.tree_map(jnp.zeros_like, y0)

    def body(step, carry):
        k_bar, y_bar_sum, params_bar = carry
        i = num_pulled - 1 - step
        y_i = _stage_input(a[i], y0, ks)
        k_bar_i = jtu.tree_map(lambda kb: kb[i], k_bar)
        y_bar_i, params_bar_i = vf_prod_vjp(_stage_time(c[i], t0, t1), y_i, k_bar_i)
        # Y_i = y_n + Σ_{j<i} a_ij k_j sends a_ij Ȳ_i to each earlier k_j.
        k_bar = jtu.tree_map(
            lambda kb, yb: kb + outer_weights(a[i], yb),
            k_bar,
            y_bar_i,
        )
        y_bar_sum = jtu.tree_map(jnp.add, y_bar_sum, y_bar_i)
        params_bar = jtu.tree_map(jnp.add, params_bar, params_bar_i)
        return k_bar, y_bar_sum, params_bar

    _, y_bar_sum, params_bar = lax.fori_loop(
        0, num_pulled, body, (k_bar, y_bar_sum, params_bar)
    )
    return y_bar_sum, params_bar
