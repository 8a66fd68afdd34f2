"""The report's figures, drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend
state, no display needed). Each function returns PNG bytes, or None when there is nothing to draw.

Series arguments are `{label: rows}` with rows as read from a metrics.jsonl file (dicts with a `step` key);
a missing or null value leaves a gap instead of failing.
"""

from __future__ import annotations

import io

DPI = 110
_COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]
_STYLES = ["-", "--", ":", "-."]


def _figure(n_panels: int, width_per_panel: float = 4.6, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_per_panel * n_panels, height), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, n_panels, i + 1) for i in range(n_panels)]
    return fig, axes


def _png(fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _xy(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and r.get("step") is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _has(series: dict[str, list[dict]], key: str) -> bool:
    return any(_xy(rows, key)[0] for rows in series.values())


def line_panels(
    series: dict[str, list[dict]], panels: list[tuple[str, list[tuple[str, str]], str]], title: str
) -> bytes | None:
    """One panel per (panel title, [(metric key, line name)], y label); one line per run and metric.

    Panels whose metrics are absent from every run are dropped; None if no panel is left.
    """
    panels = [(t, [(k, n) for k, n in keys if _has(series, k)], y) for t, keys, y in panels]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(len(panels))
    for ax, (panel_title, keys, ylabel) in zip(axes, panels):
        for color, (label, rows) in zip(_COLORS * len(series), series.items()):
            for style, (key, name) in zip(_STYLES, keys):  # colour = run, line style = metric
                xs, ys = _xy(rows, key)
                if xs:
                    parts = [p for p in (label if len(series) > 1 else "", name if len(keys) > 1 else "") if p]
                    ax.plot(
                        xs,
                        ys,
                        style,
                        color=color if len(series) > 1 else None,
                        marker="o" if len(xs) < 30 else None,
                        markersize=3,
                        label=" ".join(parts) or None,
                    )
        ax.set_title(panel_title)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return _png(fig)


def training_plot(series: dict[str, list[dict]]) -> bytes | None:
    """Distillation dynamics: loss (with its KD and CE parts), gradient norm, student completion length."""
    return line_panels(
        series,
        [
            (
                "Training loss",
                [("loss", "loss"), ("kd", "KD (T² KL)"), ("ce", "CE"), ("full_kd", "full T² KL, reference pairs")],
                "loss",
            ),
            ("Gradient norm", [("grad_norm", "grad norm")], "L2 norm before clipping"),
            ("Solution length", [("completion_len", "tokens")], "mean tokens per example"),
        ],
        "SSB training dynamics",
    )


def grpo_plot(series: dict[str, list[dict]]) -> bytes | None:
    """GRPO dynamics: mean reward (share of verified completions), loss, KL to the base, completion length."""
    return line_panels(
        series,
        [
            ("Mean reward", [("reward", "reward")], "share of correct completions"),
            ("Loss", [("loss", "loss")], "GRPO loss"),
            ("KL to base model", [("kl", "KL")], "mean per-token KL"),
            ("Completion length", [("completion_len", "tokens")], "mean tokens per completion"),
        ],
        "GRPO baseline training dynamics",
    )


def funnel_plot(funnels: dict[str, dict[str, int | None]]) -> bytes | None:
    """Horizontal bars per run: questions and where they went (all correct / all wrong / unparsed / mixed), then
    the verified teacher pairs. `funnels` maps run label -> {bar name: count or None}."""
    funnels = {k: v for k, v in funnels.items() if any(x is not None for x in v.values())}
    if not funnels:
        return None
    fig, axes = _figure(len(funnels), width_per_panel=5.2, height=3.4)
    colors = ["#4c72b0", "#8c8c8c", "#c44e52", "#dd8452", "#55a868", "#8172b3"]
    for ax, (label, bars) in zip(axes, funnels.items()):
        names = list(bars)[::-1]
        values = [bars[n] or 0 for n in names]
        ax.barh(names, values, color=colors[: len(names)][::-1])
        top = max(values) if values and max(values) > 0 else 1
        for i, (n, v) in enumerate(zip(names, values)):
            ax.text(v + top * 0.01, i, "not run" if bars[n] is None else str(v), va="center", fontsize=9)
        ax.set_xlim(0, top * 1.15)
        ax.set_xlabel("questions")
        ax.set_title(f"Curation funnel: {label}" if len(funnels) > 1 else "Curation funnel")
        ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def eval_plot(rows: list[dict]) -> bytes | None:
    """pass@1 with its confidence interval, one bar per evaluated (run, model) and benchmark.

    Each row: {"label", "benchmark", "pass1", "low", "high", "level"} with rates in [0, 1]."""
    if not rows:
        return None
    benches = sorted({r["benchmark"] for r in rows})
    fig, axes = _figure(len(benches), width_per_panel=max(3.6, 1.0 + 0.9 * len(rows) / len(benches)), height=3.8)
    for ax, bench in zip(axes, benches):
        sub = [r for r in rows if r["benchmark"] == bench]
        xs = list(range(len(sub)))
        p = [100 * r["pass1"] for r in sub]
        err = [[100 * (r["pass1"] - r["low"]) for r in sub], [100 * (r["high"] - r["pass1"]) for r in sub]]
        ax.bar(xs, p, yerr=err, capsize=4, color="#4c72b0")
        for x, v in zip(xs, p):
            ax.text(x, v / 2, f"{v:.1f}", ha="center", va="center", color="white", fontsize=8)
        ax.set_xticks(xs)
        ax.set_xticklabels([r["label"] for r in sub], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(f"pass@1 (%), {round(100 * sub[0].get('level', 0.95))}% CI")
        ax.set_ylim(0, 100)
        ax.set_title(f"pass@1 on {bench}")
        ax.grid(axis="y", alpha=0.3)
    return _png(fig)
