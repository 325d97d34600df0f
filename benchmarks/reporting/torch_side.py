"""torchdiffeq's `odeint` and `odeint_adjoint` on the report's problems: its fixed-grid
`rk4` (the 3/8 rule, the report's JAX `rk4` too), float32, on the GPU when there is one.
Imported only in its own worker process (torch is optional)."""

import time

import numpy as np
import torch
import torchdiffeq

from reporting import timing
from reporting.problems import T1, numpy_problem

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    # The problems are small: with one thread per core, torch's threads wait on each
    # other (on a shared 2-core machine, 18 times slower than with one).
    torch.set_num_threads(1)


class Field(torch.nn.Module):
    """The MLP of `numpy_problem`, counting its evaluations."""

    def __init__(self, layers):
        super().__init__()
        self.linears = torch.nn.ModuleList()
        for w, b in layers:
            lin = torch.nn.Linear(w.shape[1], w.shape[0])
            with torch.no_grad():
                lin.weight.copy_(torch.as_tensor(w))
                lin.bias.copy_(torch.as_tensor(b))
            self.linears.append(lin)
        self.to(device=DEVICE, dtype=torch.float32)
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        for lin in self.linears[:-1]:
            y = torch.tanh(lin(y))
        return self.linears[-1](y)


class Run:
    """One configuration: calling it runs the gradient (or, for the strategy `forward`,
    the solve without one) and returns the gradients as float64 arrays."""

    def __init__(self, c: dict):
        layers, y0 = numpy_problem(c)
        self.field = Field(layers)
        self.grad = c["strategy"] != "forward"
        self.y0 = torch.as_tensor(y0, dtype=torch.float32, device=DEVICE)
        self.y0.requires_grad_(self.grad)
        self.ts = torch.tensor([0.0, T1], dtype=torch.float32, device=DEVICE)
        adjoint = c["strategy"] == "torch_odeint_adjoint"
        self.solve = torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint
        self.options = dict(step_size=T1 / c["n_steps"])

    def __call__(self):
        leaves = list(self.field.parameters()) + [self.y0]
        with torch.set_grad_enabled(self.grad):
            ys = self.solve(
                self.field, self.y0, self.ts, method="rk4", options=self.options
            )
            if self.grad:
                for p in leaves:
                    p.grad = None
                (0.5 * (ys[-1] ** 2).mean()).backward()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return [p.grad.double().cpu().numpy() for p in leaves] if self.grad else []

    def evaluations(self) -> int:
        self.field.calls = 0
        self()
        return self.field.calls

    def peak(self) -> int | None:
        """Device peak of one run minus the bytes in use before it (CUDA only)."""
        if DEVICE != "cuda":
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        self()
        return int(torch.cuda.max_memory_allocated() - baseline)


def worker(configs: list[dict], repeats: int, deadline: float) -> list[dict]:
    """Rows of `configs`, each problem's strategies timed interleaved with its forward
    solve. Rows carry the gradients, for the caller to compare with JAX's references;
    those of problems not started before `deadline` come back as `{"skipped": reason}`."""
    problems, out = {}, []
    for c in configs:
        problems.setdefault(c["n_steps"], []).append(c)
    for members in problems.values():
        if time.perf_counter() > deadline:
            out += [dict(c, skipped="time budget") for c in members]
            continue
        forward = Run(dict(members[0], strategy="forward"))
        runs = {c["strategy"]: Run(c) for c in members}
        nfe_forward = forward.evaluations()
        nfe_total = {name: run.evaluations() for name, run in runs.items()}
        grads = {name: run() for name, run in runs.items()}
        _, times = timing.time_interleaved(dict(forward=forward, **runs), (), repeats)
        for c in members:
            name = c["strategy"]
            out.append(
                dict(
                    c,
                    **timing.summary(times[name], times["forward"]),
                    forward_ms=float(np.median(times["forward"])),
                    peak_bytes=runs[name].peak(),
                    nfe_forward=nfe_forward,
                    nfe_backward=nfe_total[name] - nfe_forward,
                    stages=4,
                    xla_temp_bytes=None,
                    grads=[g.tolist() for g in grads[name]],
                    torch=torch.__version__,
                    torchdiffeq=torchdiffeq.__version__,
                )
            )
    return out
