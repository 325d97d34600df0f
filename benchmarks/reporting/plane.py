"""The time–memory plane of exact gradients: which points are Pareto-optimal (no other
point takes at most as much memory and at most as much time), and its plot."""

MIB = 2**20
# Marker of each family of strategies on the plane (labels starting with the name, in
# any case); anything else is a triangle of its own.
FAMILIES = (("symplectic", "o"), ("recursivecheckpointadjoint", "s"))


def _family(label: str) -> str | None:
    return next((f for f, _ in FAMILIES if label.lower().startswith(f)), None)


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """For each (memory, time) point: whether no other point is at most as large in both
    and different."""
    return [
        not any(m <= mem and t <= time and (m, t) != (mem, time) for m, t in points)
        for mem, time in points
    ]


def plot_plane(ax, points: list[dict], title: str) -> None:
    """Draw `points` (dicts with `label`, `bytes`, `ms`, `pareto`) on `ax`, log-log, the
    Pareto frontier as a staircase."""
    for family, marker in FAMILIES:
        sel = [p for p in points if _family(p["label"]) == family]
        if sel:
            ax.scatter(
                [p["bytes"] / MIB for p in sel],
                [p["ms"] for p in sel],
                marker=marker,
                label="SymplecticAdjoint"
                if family == "symplectic"
                else "RecursiveCheckpointAdjoint",
            )
    for p in points:
        if _family(p["label"]) is None:
            ax.scatter(p["bytes"] / MIB, p["ms"], marker="^", label=p["label"])
    front = sorted((p for p in points if p["pareto"]), key=lambda p: p["bytes"])
    ax.step(
        [p["bytes"] / MIB for p in front],
        [p["ms"] for p in front],
        where="post",
        color="black",
        linewidth=0.8,
        label="Pareto frontier",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("memory of the gradient (MiB)")
    ax.set_ylabel("time of one gradient (ms)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6)
