"""Pictures of the scale disequilibrium (used by ``densefuse inspect``)."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import pandas as pd


def plot_inspection(table: pd.DataFrame, path: Union[str, Path]) -> Path:
    """Bar chart per fusion site: std of every concat subject before and after equalization."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = list(dict.fromkeys(table["site"]))
    fig, axes = plt.subplots(1, len(sites), figsize=(4.5 * len(sites), 3.6), squeeze=False)
    for ax, site in zip(axes[0], sites):
        g = table[table["site"] == site]
        x = range(len(g))
        ax.bar([i - 0.2 for i in x], g["std"], width=0.4, label="before")
        ax.bar([i + 0.2 for i in x], g["std_after"], width=0.4, label="after")
        labels = [f"{b}\nx{r:.3g}" if r == r else str(b) for b, r in zip(g["branch"], g["ratio_h"])]
        ax.set_xticks(list(x), labels)
        ax.axhline(1.0, color="k", lw=0.8, ls=":")
        ax.set_title(site, fontsize=9)
        ax.set_xlabel("branch (upsample ratio)")
        ax.set_ylabel("std of concat subject")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
