"""GradCAM grids like the paper's Fig. 5: inputs in the first row, one row of heat maps per model.

Uses the ``grad-cam`` library (pytorch-grad-cam) with the last cell of each evaluation network as the
target layer.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from nas.config import EvalConfig  # noqa: E402
from nas.data import ImageData, load_dataset, normalize  # noqa: E402
from nas.errors import ConfigError  # noqa: E402
from nas.eval_network import EvalNetwork  # noqa: E402
from nas.io import load_checkpoint  # noqa: E402
from sweeps.checkpoints import newest_state_file  # noqa: E402


def find_state(path: str | Path) -> Path:
    """state.pt from a file, a checkpoint folder, or a trial folder (its newest checkpoint)."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / "state.pt").is_file():
        return path / "state.pt"
    found = newest_state_file(path)
    if found is None:
        raise ConfigError(f"no eval checkpoint (state.pt) in {path}; pass a trial folder, checkpoint folder or file")
    return found


def load_eval_model(path: str | Path) -> tuple[EvalNetwork, EvalConfig, ImageData]:
    state = load_checkpoint(find_state(path))
    if state.get("phase") != "eval":
        raise ConfigError(f"{path} is a {state.get('phase')!r} checkpoint; GradCAM needs an eval checkpoint")
    config = EvalConfig(**state["config"])
    data = load_dataset(config.dataset, config.data_dir)
    model = EvalNetwork(config.resolved_genotype(), config.channels, config.layers, data.num_classes,
                        data.in_channels, auxiliary=config.auxiliary)
    model.load_state_dict(state["model"])
    return model.eval(), config, data


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model: EvalNetwork) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


def gradcam_maps(model: EvalNetwork, images: torch.Tensor) -> np.ndarray:
    """(N, H, W) GradCAM maps in [0, 1] for the predicted class, from the last cell."""
    from pytorch_grad_cam import GradCAM

    with GradCAM(model=_LogitsOnly(model), target_layers=[model.cells[-1]]) as cam:
        return cam(input_tensor=images, targets=None)


def gradcam_grid(checkpoints: list[str | Path], indices: list[int], out: str | Path,
                 labels: list[str] | None = None) -> Path:
    """Write a grid: the chosen test images on top, then each checkpoint's GradCAM overlays."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    models = [load_eval_model(p) for p in checkpoints]
    data = models[0][2]
    if any(i < 0 or i >= len(data.test_y) for i in indices):
        raise ConfigError(f"image indices must be in 0..{len(data.test_y) - 1}, got {indices}")
    raw = data.test_x[indices]
    rgb = (raw.float() / 255).permute(0, 2, 3, 1).numpy()
    if rgb.shape[-1] == 1:
        rgb = np.repeat(rgb, 3, axis=-1)
    inputs = normalize(raw, data.mean, data.std)
    rows = len(models) + 1
    fig, axes = plt.subplots(rows, len(indices), figsize=(2 * len(indices), 2 * rows), squeeze=False)
    for j, i in enumerate(indices):
        axes[0, j].imshow(rgb[j], interpolation="bilinear")
        axes[0, j].set_title(f"#{i} label {int(data.test_y[i])}", fontsize=8)
    for r, (model, config, _) in enumerate(models, start=1):
        maps = gradcam_maps(model, inputs)
        name = (labels[r - 1] if labels else f"{config.resolved_genotype().id} L{config.layers}")
        for j in range(len(indices)):
            axes[r, j].imshow(show_cam_on_image(rgb[j].astype(np.float32), maps[j], use_rgb=True),
                              interpolation="bilinear")
        axes[r, 0].set_ylabel(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=150)
    plt.close(fig)
    return out
