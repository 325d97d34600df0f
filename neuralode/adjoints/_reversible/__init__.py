"""Algebraically reversible Runge--Kutta solves and their gradient (McCallum & Foster
2024): the solver `Reversible` (`_solver.py`) and `ReversibleAdjoint` (`_adjoint.py`).

Let y ↦ y + Ψ_h(t, y) be one step of an explicit Runge--Kutta method, Ψ_h(t, y) =
Σ_i b_i k_i with stages k_i = F(t + c_i h, y + Σ_{j<i} a_ij k_j) (F the vector field
times the control, h·f for an ODE). The reversible scheme carries a pair (y_n, z_n),
z_0 = y_0, coupled by λ ∈ (0, 1]:

    y_{n+1} = λ y_n + (1 − λ) z_n + Ψ_h(t_n, z_n)
    z_{n+1} = z_n − Ψ_{−h}(t_{n+1}, y_{n+1})

(Ψ_{−h}(t_{n+1}, ·) is the method's step from t_{n+1} back to t_n). y_n is the
solution, of the base method's order. Each step is undone in closed form, the last
update first:

    z_n = z_{n+1} + Ψ_{−h}(t_{n+1}, y_{n+1}),
    y_n = (y_{n+1} − z_n − Ψ_h(t_n, z_n)) / λ + z_n.

So the backward pass needs no stored states. Reverse mode of one step, given
ȳ_{n+1} = ∂L/∂y_{n+1} (with the cotangents of the outputs inside the step) and
z̄_{n+1}:

    a   = ȳ_{n+1} − (∂Ψ_{−h}/∂y)ᵀ z̄_{n+1}
    ȳ_n = λ a,    z̄_n = z̄_{n+1} + (1 − λ) a + (∂Ψ_h/∂z)ᵀ a,
    θ̄  += (∂Ψ_h/∂θ)ᵀ a − (∂Ψ_{−h}/∂θ)ᵀ z̄_{n+1},

each VJP of Ψ taken stage by stage, as the symplectic adjoint pulls back a step
(`_symplectic/_tableau.py`: k̄_i = b_i·cotangent + Σ_{j>i} a_ji Ȳ_j, one VJP of F per
stage, so that one evaluation of f has live activations). At the start,
∂L/∂y_0 = ȳ_0 + z̄_0. The step sizes are constants of the discretisation (Diffrax's
controllers stop gradients through their error estimates), so the accepted steps'
intervals are all the backward pass keeps, and the result equals
`diffrax.RecursiveCheckpointAdjoint` on the same `Reversible` solver, to the rounding
errors of undoing the steps.
"""

from ._adjoint import ReversibleAdjoint as ReversibleAdjoint
from ._solver import Reversible as Reversible
