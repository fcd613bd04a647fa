"""Layer x expert heat-maps of router statistics (shared by moa-eval and the trainer)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display, safe in CI and on clusters

import matplotlib.pyplot as plt  # noqa: E402  (must follow the backend choice)

from moa_train.files import atomic_path  # noqa: E402


def save_heatmap(
    matrix: Sequence[Sequence[float]],
    layers: Sequence[int | str],
    experts: Sequence[str],
    path: str | os.PathLike[str],
    title: str = "",
    *,
    vmin: float | None = 0.0,
    vmax: float | None = None,
    label: str = "mean gate",
) -> Path:
    """Write ``matrix`` (rows = layers, columns = experts) as a PNG heat-map and return the path.

    The colour scale starts at 0 by default so that maps of different runs/datasets compare by eye.
    The file is written next to its target and renamed, so a reader never sees a half-written PNG.
    """
    rows = [list(map(float, r)) for r in matrix]
    if len(rows) != len(layers) or any(len(r) != len(experts) for r in rows):
        raise ValueError(
            f"heat-map shape {len(rows)}x{len(rows[0]) if rows else 0} does not match "
            f"{len(layers)} layers x {len(experts)} experts"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height = min(2.0 + 0.28 * len(layers), 14.0)
    width = min(2.5 + 0.8 * len(experts), 12.0)
    fig, ax = plt.subplots(figsize=(width, height))
    try:
        image = ax.imshow(rows, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_xticks(range(len(experts)), [str(e) for e in experts], rotation=45, ha="right")
        step = max(1, len(layers) // 16)  # keep layer tick labels legible for deep models
        ax.set_yticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)])
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        if title:
            ax.set_title(title)
        fig.colorbar(image, ax=ax, label=label)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path
