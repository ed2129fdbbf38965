"""A before/after heatmap of per-GPU load (layers × GPUs), drawn with matplotlib."""

from __future__ import annotations

from pathlib import Path

import torch


def plot_gpu_loads(before: torch.Tensor, after: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """Save a PNG with two panels, GPU load without and with EPLB, on one shared colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vmax = float(max(before.max(), after.max()))
    layers, gpus = before.shape
    fig, axes = plt.subplots(1, 2, figsize=(2 * min(3 + 0.25 * gpus, 9), 2 + min(0.3 * layers, 9)), sharey=True)
    for ax, loads, name in ((axes[0], before, "before"), (axes[1], after, "after")):
        image = ax.imshow(loads.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        bal = (loads.mean(1) / loads.max(1).values.clamp_min(1e-12)).mean()
        ax.set_title(f"{name}: mean balancedness {float(bal):.3f}")
        ax.set_xlabel("GPU")
    axes[0].set_ylabel("layer")
    fig.colorbar(image, ax=axes, label="load (tokens)")
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
