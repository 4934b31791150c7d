"""Matplotlib figures of the benchmarks (PNG, no display needed)."""

from __future__ import annotations

from pathlib import Path


def acceptance_vs_gamma(scan: dict[str, dict[int, dict]], path: str | Path, title: str) -> Path:
    """Two panels over gamma, one line per drafter: alpha, and speedup (measured solid, theoretical dashed).

    scan: drafter name -> gamma -> {"alpha", "speedup_measured", "speedup_theoretical"}.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: benchmarks run on cluster nodes and CI
    import matplotlib.pyplot as plt

    fig, (ax_a, ax_s) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, by_gamma) in enumerate(sorted(scan.items())):
        gammas = sorted(by_gamma)
        color = f"C{i % 10}"
        ax_a.plot(gammas, [by_gamma[g]["alpha"] for g in gammas], "o-", color=color, label=name)
        ax_s.plot(gammas, [by_gamma[g]["speedup_measured"] for g in gammas], "o-", color=color, label=name)
        ax_s.plot(gammas, [by_gamma[g]["speedup_theoretical"] for g in gammas], "--", color=color, alpha=0.6)
    ax_a.set(xlabel="gamma (draft length)", ylabel="alpha = A / (A + R)", title="acceptance", ylim=(0, 1))
    ax_s.axhline(1.0, color="grey", lw=0.8)
    ax_s.set(
        xlabel="gamma (draft length)",
        ylabel="speedup over plain decoding",
        title="speedup: measured (solid), theoretical (dashed)",
    )
    ax_a.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    fig.clf()
    return path


def quality_vs_steps(
    curves: dict[str, dict[int, dict]], path: str | Path, title: str, baselines: dict[str, dict] | None = None
) -> Path:
    """Two panels over sampling steps (log scale, fewer steps to the right): Gen PPL and unigram entropy.

    curves: name -> steps -> {"gen_ppl", "entropy"}; a curve named "teacher" is drawn in black.
    baselines: name -> {"gen_ppl", "entropy"} drawn as dashed horizontal lines (autoregressive models).
    """
    plt = _pyplot()
    fig, (ax_p, ax_h) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, by_steps) in enumerate(curves.items()):
        steps = sorted(by_steps, reverse=True)
        if not steps:
            continue
        style = {"color": "black", "lw": 2.2} if name == "teacher" else {"color": f"C{i % 10}", "lw": 1.2}
        ax_p.plot(steps, [by_steps[s]["gen_ppl"] for s in steps], "o-", label=name, **style)
        ax_h.plot(steps, [by_steps[s]["entropy"] for s in steps], "o-", label=name, **style)
    for j, (name, figures) in enumerate((baselines or {}).items()):
        style = {"color": "grey", "lw": 1.0, "ls": ("--", ":", "-.")[j % 3], "label": name}
        ax_p.axhline(figures["gen_ppl"], **style)
        ax_h.axhline(figures["entropy"], **style)
    ticks = sorted({s for by_steps in curves.values() for s in by_steps})
    for ax, label in ((ax_p, "generative perplexity"), (ax_h, "unigram entropy (nats)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(s) for s in ticks])
        ax.minorticks_off()
        ax.invert_xaxis()
        ax.set(xlabel="sampling steps", ylabel=label)
    ax_p.set_yscale("log")
    ax_p.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def loss_per_round(curves: dict[str, list[tuple[int, float, int]]], path: str | Path, title: str) -> Path:
    """One panel per distillation run: the loss at every optimizer step, coloured by round.

    curves: run name -> [(step, loss, round)], round 1-based.
    """
    plt = _pyplot()
    n = max(1, len(curves))
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, (name, points) in zip(axes.flat, curves.items()):
        for k in sorted({p[2] for p in points}):
            xs = [p[0] for p in points if p[2] == k]
            ys = [p[1] for p in points if p[2] == k]
            ax.plot(xs, ys, lw=0.9, color=f"C{(k - 1) % 10}", label=f"round {k}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.tick_params(labelsize=7)
        if points and min(p[1] for p in points) > 0:
            ax.set_yscale("log")
        ax.legend(fontsize=6)
    return _finish_grid(plt, fig, axes, len(curves), path, title)


def metrics_by_variant(figures: dict[str, dict[str, float]], path: str | Path, title: str) -> Path:
    """One bar panel per metric, one bar per variant (token weighting: long PPL, LongPPL, probes, short PPL).

    figures: variant -> metric -> value (NaN or missing: no bar); "uniform" is drawn in black.
    """
    plt = _pyplot()
    metrics = list(dict.fromkeys(k for v in figures.values() for k in v))
    cols = min(3, max(1, len(metrics)))
    rows = -(-max(1, len(metrics)) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.0 * rows), squeeze=False)
    names = list(figures)
    for ax, metric in zip(axes.flat, metrics):
        values = [figures[n].get(metric, float("nan")) for n in names]
        colors = ["black" if n == "uniform" else f"C{i % 10}" for i, n in enumerate(names)]
        ax.bar(range(len(names)), values, color=colors)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    return _finish_grid(plt, fig, axes, len(metrics), path, title)


def _finish_grid(plt, fig, axes, used: int, path: str | Path, title: str) -> Path:
    """Blank the panels past the first `used`, title the figure, save it and free it."""
    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out
