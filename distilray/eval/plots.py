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
