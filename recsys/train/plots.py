"""Training curves as a PNG: step loss, and validation AUC and logloss per epoch."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(history: list[dict], step_losses: list[tuple[int, float]], path: Path, title: str,
                monitor: str = "auc") -> None:
    """Three panels: the step loss, the monitored validation metric, and train loss beside validation logloss
    (or, for a stage without one, the validation loss it reports)."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    if step_losses:
        steps, losses = zip(*step_losses, strict=True)
        axes[0].plot(steps, losses, lw=0.8)
    axes[0].set(title="training loss", xlabel="step", ylabel="loss")
    epochs = [h["epoch"] + 1 for h in history]
    axes[1].plot(epochs, [h[f"valid_{monitor}"] for h in history], "o-", label="valid")
    axes[1].set(title=monitor, xlabel="epoch")
    loss_key = "valid_logloss" if "valid_logloss" in history[0] else next(
        (k for k in history[0] if k.startswith("valid_") and "loss" in k), None)
    if loss_key is not None:
        axes[2].plot(epochs, [h[loss_key] for h in history], "o-", label="valid")
    axes[2].plot(epochs, [h["train_loss"] for h in history], "s--", label="train")
    axes[2].set(title="loss", xlabel="epoch")
    axes[2].legend()
    for ax in axes[1:]:
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
