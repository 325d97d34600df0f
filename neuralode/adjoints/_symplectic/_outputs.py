"""The pullbacks of what a solve outputs: its saves (`SaveAt` of `t0`, `t1`, `ts` and
`steps`, each through its `fn`, in `subs`), its dense output and an event time.

Each cotangent of a saved value fn(t, y, args) is pulled back through `fn` (whose VJP
also gives ∂L/∂args and the cotangent of what `fn` holds) to the y it was taken of:
y_{n+1} for a step save (added to λ), Diffrax's interpolation of the step for a save at
some t inside it (added to the cotangents of y_n, y_{n+1} and the stages k), y0 for the
t0 saves. The cotangent of a step's dense output (y_n, y_{n+1}, k) adds to the same.
An event time t* found by a root finder is a root of φ(t) = c(t, y(t)) on the last
step's interpolation, so dt* = -(∂φ/∂(y_n, y_{n+1}, k, θ)) / (∂φ/∂t) (implicit function
theorem).
"""

import functools as ft
from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu

from .. import _diffrax_private as private

add = ft.partial(jtu.tree_map, jnp.add)


def add_cotangent(x, g):
    """`x + g`, where `g` may be or hold `None` (a symbolic zero)."""
    if g is None:
        return x
    return jtu.tree_map(lambda a, b: a if b is None else a + b, x, g)


def index(tree, i):
    return jtu.tree_map(lambda buf: buf[i], tree)


def is_subsaveat(x) -> bool:
    return isinstance(x, diffrax.SubSaveAt)


def subs_of(saveat: diffrax.SaveAt) -> list[diffrax.SubSaveAt]:
    return jtu.tree_leaves(saveat.subs, is_leaf=is_subsaveat)


def per_sub(saveat: diffrax.SaveAt, tree) -> list:
    """`tree` (shaped like the solve's outputs) as a list, one entry per `SubSaveAt`."""
    return jtu.tree_structure(saveat.subs, is_leaf=is_subsaveat).flatten_up_to(tree)


class Output:
    """One `SubSaveAt` of the solve and the cotangent of what it saved.

    Diffrax writes its saves in order: fn(t0) if `t0`; then, step by step, the `ts`
    inside the step followed by the step's end if `steps` divides the step's number;
    then fn(t1) if `t1` and not already saved as a step.
    """

    def __init__(self, position, sub, fn, grad_ys, t0, y0, args, max_steps):
        self.position = position
        self.saves_y = fn is private.save_y
        self.t0 = int(sub.t0)
        self.t1 = sub.t1
        self.ts = sub.ts
        self.num_ts = 0 if sub.ts is None else len(sub.ts)
        self.steps = int(sub.steps)
        self.struct = eqx.filter_eval_shape(fn, t0, y0, args)
        size = self.t0 + self.num_ts
        if self.steps:
            size += max_steps // self.steps
        if self.t1 and (not self.steps or max_steps % self.steps):
            size += 1
        self.grad_ys = _materialise(grad_ys, self.struct, size)

    def slot(self, num_ts_before, num_steps_before):
        """Where the save made after `num_ts_before` of the `ts` and
        `num_steps_before` steps is written."""
        step_saves = num_steps_before // self.steps if self.steps else 0
        return self.t0 + num_ts_before + step_saves

    def cotangent(self, num_ts_before, num_steps_before):
        """The cotangent of the save made after `num_ts_before` of the `ts` and
        `num_steps_before` steps."""
        return index(self.grad_ys, self.slot(num_ts_before, num_steps_before))

    def ts_cotangent_if(self, pred):
        """The summed cotangents of all the `ts` saves if `pred`, else zeros."""
        return jtu.tree_map(
            lambda gys: jnp.where(
                pred, jnp.sum(gys[self.t0 : self.t0 + self.num_ts], axis=0), 0
            ),
            self.grad_ys,
        )


def _materialise(grad_ys, struct, size):
    """Zeros where JAX passed a symbolic-zero (`None`) cotangent."""
    zeros = lambda s: jnp.zeros((size, *s.shape), s.dtype)
    if grad_ys is None:
        return jtu.tree_map(zeros, struct)
    return jtu.tree_map(
        lambda g, s: zeros(s) if g is None else g,
        grad_ys,
        struct,
        is_leaf=lambda x: x is None,
    )


def rk_dense_info(solver, y_start, y_end, ks) -> dict:
    """The dense output Diffrax's explicit RK `solver` gives a step: its ends and, but
    for Euler, its stages k."""
    if type(solver) is diffrax.Euler:
        return dict(y0=y_start, y1=y_end)
    return dict(y0=y_start, y1=y_end, k=ks)


def _identity(y):
    return y


class EventRoot(eqx.Module):
    """The event time t* and y* = y(t*) a root finder found, whether an event
    happened, and which of the event's conditions triggered."""

    t: Any
    y: Any
    happened: Any
    mask: Any


class Outputs:
    """The pullbacks of every output of one solve, given the cotangents of the saves
    (`grad_save_state`, as JAX passes them) and of the dense output (`dense_bar`)."""

    def __init__(
        self,
        *,
        saveat,
        fns,
        grad_save_state,
        dense_bar,
        num_ts_saved,
        event_root,
        solver,
        params,
        static,
        t0,
        t1,
        y0,
        args,
        max_steps,
        dense_info: Callable | None = None,
    ):
        grads = per_sub(saveat, grad_save_state)
        self.outputs = [
            Output(i, sub, fns[i], grad.ys, t0, y0, args, max_steps)
            for i, (sub, grad) in enumerate(zip(subs_of(saveat), grads, strict=True))
        ]
        self.grad_ts = [grad.ts for grad in grads]
        # With t0 == t1 no step is taken and Diffrax saves fn(t0, y0, args) at every
        # ts without counting them.
        self.num_ts_saved = [
            jnp.where(t0 == t1, out.num_ts, saved)
            for out, saved in zip(self.outputs, num_ts_saved, strict=True)
        ]
        self.saves_ts = [out for out in self.outputs if out.num_ts]
        self.dense_bar = dense_bar
        self.event_root = event_root
        self.solver, self.params, self.static = solver, params, static
        # A step's dense output from its ends and stages; `ks` may be any PyTree
        # that a solver other than a plain RK one interpolates with.
        self.dense_info = dense_info or ft.partial(rk_dense_info, solver)
        self.t0, self.t1, self.y0 = t0, t1, y0

    @property
    def interpolates(self) -> bool:
        """Whether some step is interpolated (a save inside it, dense output, the
        event time), which needs every stage."""
        return (
            bool(self.saves_ts)
            or self.dense_bar is not None
            or (self.event_root is not None)
        )

    def interpolate(self, t_start, t_end, y_start, y_end, ks, t):
        info = self.dense_info(y_start, y_end, ks)
        return self.solver.interpolation_cls(t0=t_start, t1=t_end, **info).evaluate(t)

    def pull_value(
        self, out, t, y_of, primals, g, params_bar, of_t=False
    ) -> tuple[Any, Any]:
        """Cotangents of `primals` from the cotangent `g` of the saved value
        `fn(t, y_of(*primals), args)` of `out`; those of `args` and of `fn` are added
        to `params_bar`. With `of_t`, `t` is the first of `primals`, a variable too."""
        if out.saves_y:
            if of_t:  # y_of(t, y) = y
                return (jnp.zeros_like(t), g), params_bar
            _, vjp = jax.vjp(y_of, *primals)
            return vjp(g), params_bar

        def value(params, *primals):
            _args, _, _fns, _ = eqx.combine(params, self.static)
            if of_t:
                t_, *primals = primals
                return _fns[out.position](t_, y_of(*primals), _args)
            return _fns[out.position](t, y_of(*primals), _args)

        _, vjp = jax.vjp(value, self.params, *primals)
        params_bar_value, *primals_bar = vjp(g)
        return tuple(primals_bar), add(params_bar, params_bar_value)

    def pull_value_if(self, pred, out, t, y, g, params_bar):
        """`pull_value` of a save at (t, y) that happened if `pred` (may be traced)."""
        if pred is True:
            (y_bar,), params_bar = self.pull_value(
                out, t, _identity, (y,), g, params_bar
            )
            return y_bar, params_bar
        return lax.cond(
            pred,
            lambda p: self.pull_value_if(True, out, t, y, g, p),
            lambda p: (jtu.tree_map(jnp.zeros_like, y), p),
            params_bar,
        )

    def at_end(self, num_steps, t_final, y_final, params_bar):
        """λ = ∂L/∂y at the end of the last step, from the saves made there (at t1,
        or at the event time t*), and the parameters' cotangent so far. The
        cotangents of t* and y* are kept for the last step's pullback."""
        lam = jtu.tree_map(jnp.zeros_like, self.y0)
        if self.event_root is None:
            for out in self.outputs:
                if out.t1 and out.steps != 1:  # not already the last step's save
                    is_saved = True if not out.steps else num_steps % out.steps != 0
                    g = out.cotangent(self.num_ts_saved[out.position], num_steps)
                    y_bar, params_bar = self.pull_value_if(
                        is_saved, out, t_final, y_final, g, params_bar
                    )
                    lam = add(lam, y_bar)
            return lam, params_bar
        # The t1 saves are made at t* (or at the end, if no event happened).
        root = self.event_root
        t_star_bar = jnp.zeros_like(root.t)
        y_star_bar = lam
        for out, grad_ts in zip(self.outputs, self.grad_ts, strict=True):
            if not out.t1:
                continue
            slot = out.slot(self.num_ts_saved[out.position], num_steps)
            g = index(out.grad_ys, slot)
            (t_bar, y_bar), params_bar = self.pull_value(
                out, root.t, _identity, (root.t, root.y), g, params_bar, of_t=True
            )
            if grad_ts is not None:  # the event time itself, as `sol.ts`
                t_bar = t_bar + grad_ts[slot]
            t_star_bar = t_star_bar + t_bar
            y_star_bar = add(y_star_bar, y_bar)
        self.star_bar = (t_star_bar, y_star_bar)
        # Without an event, y* is the last step's end.
        lam = jtu.tree_map(lambda b: jnp.where(root.happened, 0, b), y_star_bar)
        return lam, params_bar

    def at_start(self, y0_bar, params_bar):
        """Add the cotangents of the t0 saves, and with t0 == t1 of the ts saves, all
        of fn(t0, y0, args)."""
        for out in self.outputs:
            g = jtu.tree_map(jnp.zeros_like, out.struct)
            if out.t0:
                g = index(out.grad_ys, 0)
            if out.num_ts:
                g = add(g, out.ts_cotangent_if(self.t0 == self.t1))
            if out.t0 or out.num_ts:
                y_bar, params_bar = self.pull_value_if(
                    True, out, self.t0, self.y0, g, params_bar
                )
                y0_bar = add(y0_bar, y_bar)
        return y0_bar, params_bar

    def initial_ts_indices(self):
        """For each output, the index of the last `ts` save (counting down)."""
        return tuple(n - 1 for n in self.num_ts_saved)

    def _has_save(self, out, j, n, t_start):
        # Diffrax saves ts[j] in the first step with ts[j] <= t_end.
        return (j >= 0) & ((out.ts[jnp.maximum(j, 0)] > t_start) | (n == 0))

    def interpolated(self, n, t_start, ts_indices, num_steps):
        """Whether step `n` is interpolated: `True`, `False` or a traced bool."""
        if self.dense_bar is not None:
            return True
        preds = [
            self._has_save(out, ts_indices[out.position], n, t_start)
            for out in self.saves_ts
        ]
        if self.event_root is not None:
            preds.append(n == num_steps - 1)
        return ft.reduce(jnp.logical_or, preds, False)

    def in_step(self, n, step, ks, cotangents, num_steps):
        """Add the cotangents of step `n`'s outputs: its save (to λ), the `ts` saves
        inside it, its dense output and the event time (to y_n, λ and k). `step` is
        `(t_start, t_end, y_start, y_end)`; `cotangents` is
        `(ts_indices, y_start_bar, λ, k_bar, params_bar)`, returned updated."""
        t_start, t_end, y_start, y_end = step
        ts_indices, y_start_bar, lam, k_bar, params_bar = cotangents
        if self.dense_bar is not None:
            info_bar = index(self.dense_bar, n)
            y_start_bar = add_cotangent(y_start_bar, info_bar["y0"])
            lam = add_cotangent(lam, info_bar["y1"])
            if "k" in info_bar:  # Euler's has none
                k_bar = add_cotangent(k_bar, info_bar["k"])
        if self.event_root is not None:
            y_start_bar, lam, k_bar, params_bar = lax.cond(
                self.event_root.happened & (n == num_steps - 1),
                ft.partial(self._pull_event_time, step, ks),
                lambda *cotangents: cotangents,
                y_start_bar,
                lam,
                k_bar,
                params_bar,
            )
        ts_indices = list(ts_indices)
        for out in self.outputs:
            if out.steps:
                # Saved after this step's ts saves, if the step's number divides.
                g = out.cotangent(ts_indices[out.position] + 1, n)
                is_saved = True if out.steps == 1 else (n + 1) % out.steps == 0
                y_end_bar, params_bar = self.pull_value_if(
                    is_saved, out, t_end, y_end, g, params_bar
                )
                lam = add(lam, y_end_bar)
            if out.num_ts:
                carry = (ts_indices[out.position], y_start_bar, lam, k_bar, params_bar)
                carry = self._pull_ts_saves(out, n, step, ks, carry)
                ts_indices[out.position], y_start_bar, lam, k_bar, params_bar = carry
        return tuple(ts_indices), y_start_bar, lam, k_bar, params_bar

    def _pull_ts_saves(self, out, n, step, ks, carry):
        """Pull back the `ts` saves of `out` inside step `n`, last to first."""
        t_start, t_end, y_start, y_end = step

        def pull_save(carry):
            j, y_start_bar, lam, k_bar, params_bar = carry
            (ya_bar, yb_bar, kk_bar), params_bar = self.pull_value(
                out,
                out.ts[j],
                lambda ya, yb, k: self.interpolate(
                    t_start, t_end, ya, yb, k, out.ts[j]
                ),
                (y_start, y_end, ks),
                out.cotangent(j, n),
                params_bar,
            )
            return (
                j - 1,
                add(y_start_bar, ya_bar),
                add(lam, yb_bar),
                add(k_bar, kk_bar),
                params_bar,
            )

        return lax.while_loop(
            lambda c: self._has_save(out, c[0], n, t_start), pull_save, carry
        )

    def _pull_event_time(self, step, ks, y_start_bar, lam, k_bar, params_bar):
        """Add the cotangents of y* = y(t*) and of the event time t* to those of the
        last step's (y_n, y_{n+1}, k) and of the parameters."""
        t_start, t_end, y_start, y_end = step
        root = self.event_root
        t_star_bar, y_star_bar = self.star_bar

        def y_at(t, y_start, y_end, ks):
            return self.interpolate(t_start, t_end, y_start, y_end, ks, t)

        def condition(t, y_start, y_end, ks, params):
            _args, _, _, _event = eqx.combine(params, self.static)
            y = y_at(t, y_start, y_end, ks)
            cond_fns = jtu.tree_leaves(_event.cond_fn, is_leaf=callable)
            value = 0.0
            masks = jtu.tree_leaves(root.mask)
            for mask, cond_fn in zip(masks, cond_fns, strict=True):
                value_i = cond_fn(t, y, _args)
                if jnp.issubdtype(jnp.result_type(value_i), jnp.bool_):
                    value_i = t_end - t  # Diffrax's root for a boolean condition
                value = value + jnp.where(mask, value_i, 0.0)
            return value

        primals = (y_start, y_end, ks)
        _, y_at_vjp = jax.vjp(y_at, root.t, *primals)
        t_bar, *y_at_bar = y_at_vjp(y_star_bar)
        # One pullback of the scalar φ gives ∂φ/∂t and ∂φ/∂(y_n, y_{n+1}, k, θ).
        value, condition_vjp = jax.vjp(condition, root.t, *primals, self.params)
        d_condition_dt, *d_condition = condition_vjp(jnp.ones_like(value))
        dt_star_bar = -(t_star_bar + t_bar) / d_condition_dt
        *condition_bar, params_bar_condition = jtu.tree_map(
            lambda d: (dt_star_bar * d).astype(d.dtype), d_condition
        )
        y_start_bar, lam, k_bar = (
            add(add(a, b), c)
            for a, b, c in zip(
                (y_start_bar, lam, k_bar), y_at_bar, condition_bar, strict=True
            )
        )
        return y_start_bar, lam, k_bar, add(params_bar, params_bar_condition)
