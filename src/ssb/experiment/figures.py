"""Figures of an experiment's results (matplotlib, Agg): pass@1 per arm with its interval and the per-seed points,
paired differences against the reference arms, and the yield funnel per arm."""

from __future__ import annotations

from pathlib import Path

from ssb.files import atomic_write_bytes


def _png(fig) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _fig(panels: int, width: float = 4.8, height: float = 3.6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(width * panels, height), squeeze=False)
    return fig, list(axes[0])


def pass1_figure(res: dict) -> bytes | None:
    evals = [(n, e) for n, e in res["eval"].items() if any(a.get("seeds_done") for a in e["arms"].values())]
    if not evals:
        return None
    fig, axes = _fig(len(evals))
    for ax, (name, ev) in zip(axes, evals):
        arms = [(a, r) for a, r in ev["arms"].items() if r.get("seeds_done")]
        for x, (_, r) in enumerate(arms):
            m = 100 * r["pass@1"]
            ax.errorbar(x, m, yerr=[[m - 100 * r["low"]], [100 * r["high"] - m]], fmt="o", color="C0", capsize=4)
            seeds = list(r["per_seed"].values())
            ax.scatter([x + 0.15] * len(seeds), [100 * v for v in seeds], s=12, color="C1", zorder=3)
        ax.set_xticks(range(len(arms)), [a for a, _ in arms], rotation=20)
        ax.set_ylabel("pass@1 (%)")
        ax.set_title(f"{name}: mean over seeds, 95% CI; dots: seeds", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def differences_figure(res: dict) -> bytes | None:
    evals = [(n, e) for n, e in res["eval"].items() if e["paired"]]
    if not evals:
        return None
    fig, axes = _fig(len(evals), height=0.5 + 0.45 * max(len(e["paired"]) for _, e in evals) + 1.2)
    for ax, (name, ev) in zip(axes, evals):
        for y, p in enumerate(ev["paired"]):
            d = 100 * p["diff"]
            color = "C2" if p["low"] > 0 else ("C3" if p["high"] < 0 else "C7")
            ax.errorbar(d, y, xerr=[[d - 100 * p["low"]], [100 * p["high"] - d]], fmt="o", color=color, capsize=4)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(ev["paired"])), [f"{p['a']} − {p['b']}" for p in ev["paired"]])
        ax.invert_yaxis()
        ax.set_xlabel("Δ pass@1 (points), paired 95% CI")
        ax.set_title(name, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def funnel_figure(res: dict) -> bytes | None:
    fun = {
        a: rows
        for a, rows in (res.get("funnel") or {}).items()
        if any(r.get("mixed") is not None for r in rows.values())
    }
    if not fun:
        return None
    keys = [
        ("mixed_share", "questions mixed (%)", 100),
        ("teacher_pass_rate", "teacher pass rate (%)", 100),
        ("pairs", "verified pairs", 1),
    ]
    fig, axes = _fig(3, width=4.0)
    arms = list(fun)
    for ax, (key, label, scale) in zip(axes, keys):
        for x, arm in enumerate(arms):
            vals = [scale * r[key] for r in fun[arm].values() if r.get(key) is not None]
            if vals:
                ax.bar(x, sum(vals) / len(vals), color="C0", alpha=0.5)
                ax.scatter([x] * len(vals), vals, s=12, color="C1", zorder=3)
        ax.set_xticks(range(len(arms)), arms, rotation=20)
        ax.set_title(f"{label}: mean; dots: seeds", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def write_figures(res: dict, out: Path) -> list[str]:
    """Write the figures that have data; returns their file names."""
    written = []
    for name, make in (
        ("pass1.png", pass1_figure),
        ("differences.png", differences_figure),
        ("funnel.png", funnel_figure),
    ):
        data = make(res)
        if data is not None:
            atomic_write_bytes(Path(out) / name, data)
            written.append(name)
    return written
