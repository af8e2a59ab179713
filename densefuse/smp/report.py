"""Per-site tables of an equalized smp model: live measurement, or the frozen calibration stats."""
from __future__ import annotations

from typing import Any, Iterable, Optional

import pandas as pd
from torch import nn

from ..calibration import equalizers, measure
from ..errors import CalibrationError
from .attach import SmpEqualizer


def report(model: nn.Module, batches: Optional[Iterable[Any]] = None, num_images: Optional[int] = None) -> pd.DataFrame:
    """Per site and branch: mean/std before and after equalization.

    With ``batches``, the stats are measured on them (train-mode BN, nothing changes; see
    :func:`densefuse.measure`). Without, the frozen calibration stats are reported (``after`` is
    then 0/1 by construction for a calibrated site in mode explicit or fold).
    """
    eqs = [(n, eq) for n, eq in equalizers(model) if isinstance(eq, SmpEqualizer)]
    if not eqs:
        raise CalibrationError("the model has no smp scale equalizers; call densefuse.smp.equalize(model) first")
    by_name = {n: eq for n, eq in eqs}
    by_name.update({eq.site.consumer: eq for _, eq in eqs})  # whichever name measure() reports
    if batches is not None:
        df = measure(model, batches, num_images)
        df = df[df["site"].isin(list(by_name))].copy()
        df["interpolated"] = [by_name[s].site.interpolated[b] for s, b in zip(df["site"], df["branch"])]
        df["site"] = [by_name[s].site.consumer for s in df["site"]]
        cols = ["site", "branch", "channels", "interpolated", "mean", "std", "var_before",
                "mean_after", "std_after", "var_after", "mode"]
        return df[cols].reset_index(drop=True)
    rows = []
    for _, eq in eqs:
        if not eq._is_calibrated:
            raise CalibrationError(
                f"site '{eq.site.consumer}' is not calibrated; run densefuse.calibrate(model, batches) first "
                "or pass batches to report()"
            )
        active = eq.mode != "off"
        for i, g in enumerate(eq.groups):
            mu, sd = float(eq.mean[i]), float(eq.std[i])
            rows.append({
                "site": eq.site.consumer, "branch": i, "channels": g, "interpolated": eq.site.interpolated[i],
                "mean": mu, "std": sd, "var_before": sd**2,
                "mean_after": 0.0 if active else mu, "std_after": 1.0 if active else sd,
                "var_after": 1.0 if active else sd**2, "mode": eq.mode,
            })
    return pd.DataFrame(rows)

