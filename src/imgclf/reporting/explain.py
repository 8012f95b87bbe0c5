"""What the model looks at: Grad-CAM heatmaps and the first layers' feature maps.

Grad-CAM comes from Captum (``LayerGradCam``), PyTorch's own interpretability library: it works
on any module of any ``nn.Module``, needs nothing beyond torch, numpy and matplotlib (grad-cam
pulls in OpenCV), and offers other attributions (Integrated Gradients, occlusion) from the same
API. The layer is found, not configured: the last module inside the backbone whose output is still
a spatial map (``N x C x H x W``, larger than 1 x 1), found by one traced forward pass. That is the last stage or
``conv_head`` of a timm CNN and the last block of the simple CNN; a model with no such layer (a
vision transformer) gets a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imgclf.data.images import load_image
from imgclf.data.inputs import expand_inputs
from imgclf.data.transforms import build_eval_transform
from imgclf.errors import ConfigError
from imgclf.evaluation.predictions import Predictions
from imgclf.reporting.plots import save_feature_maps, save_overlay
from imgclf.runs.heads import ClassicalRun


@dataclass(frozen=True)
class Explanation:
    path: str
    image: np.ndarray  # H x W x C uint8, as the model saw it
    target: int  # the class explained
    probs: np.ndarray  # K probabilities
    heatmap: np.ndarray  # H x W in [0, 1]


def spatial_layers(model: nn.Module, image_shape: tuple[int, int, int]) -> list[tuple[str, nn.Module]]:
    """Backbone modules whose output is a spatial map, in the order they finish in a forward pass."""
    found: list[tuple[str, nn.Module]] = []
    hooks = [module.register_forward_hook(
        lambda mod, _in, out, name=name: found.append((name, mod))
        if isinstance(out, torch.Tensor) and out.ndim == 4 and min(out.shape[2:]) > 1 else None)
        for name, module in model.backbone.named_modules(prefix="backbone")]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *image_shape, device=next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    return found


def cam_layer(model: nn.Module, image_shape: tuple[int, int, int]) -> tuple[str, nn.Module]:
    layers = spatial_layers(model, image_shape)
    if not layers:
        raise ConfigError("Grad-CAM needs a convolutional backbone with spatial feature maps; "
                          "this model has none (a vision transformer?)")
    return layers[-1]


class Explainer:
    """Grad-CAM for a run's model: ``explain(paths)`` -> one Explanation per image."""

    def __init__(self, run):
        from captum.attr import LayerGradCam

        if isinstance(run, ClassicalRun):
            raise ConfigError(f"Grad-CAM needs a differentiable head; {run.path} has a scikit-learn "
                              f"{run.config.model.head}")
        self.model = run.model.float().eval()  # an ensemble says here that it has no single model
        self.run, self.pre = run, run.preprocess
        shape = (self.pre.channels, self.pre.size, self.pre.size)
        self.layer_name, layer = cam_layer(self.model, shape)
        self.cam = LayerGradCam(self._logits, layer)
        self.transform = build_eval_transform(self.pre.mean, self.pre.std)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """One logit per class, also for a single-unit sigmoid head (its negative is class 0's)."""
        z = self.model(x)
        return torch.cat([-z, z], 1) if z.shape[1] == 1 else z

    def load(self, path: str | Path) -> np.ndarray:
        return load_image(path, self.pre.size, self.pre.channels, self.pre.interpolation)

    def explain(self, paths: list[str | Path], targets: list[int] | None = None) -> list[Explanation]:
        """Explain the decided class (``decide``), or ``targets[i]`` for image i."""
        images = [self.load(p) for p in paths]
        batch = torch.stack([self.transform(torch.from_numpy(a.transpose(2, 0, 1).copy())) for a in images])
        batch = batch.to(self.run.device)
        with torch.no_grad():
            probs = self.run.objective.probabilities(self.model(batch)).cpu().numpy()
        chosen = list(targets) if targets is not None else self.decide(probs)
        with torch.enable_grad():
            attribution = self.cam.attribute(batch, target=chosen, relu_attributions=True)
        heat = torch.nn.functional.interpolate(attribution.detach().float(), size=batch.shape[2:],
                                               mode="bilinear", align_corners=False)[:, 0].cpu().numpy()
        peak = heat.reshape(len(heat), -1).max(1).reshape(-1, 1, 1)
        heat = np.divide(heat, peak, out=np.zeros_like(heat), where=peak > 0)
        return [Explanation(str(p), a, t, pr, h) for p, a, t, pr, h in
                zip(paths, images, chosen, probs, heat, strict=True)]

    def decide(self, probs: np.ndarray) -> list[int]:
        """The run's decisions: its binary threshold where it has one, else the most probable class."""
        preds = Predictions([""] * len(probs), self.run.classes, np.full(len(probs), -1), probs)
        return preds.at_threshold(self.run.threshold, self.run.positive).pred.tolist()

    def feature_maps(self, path: str | Path, layers: int = 2, channels: int = 16) -> list[tuple[str, np.ndarray]]:
        """The first ``layers`` convolutions' outputs for one image: (name, ``channels x h x w``)."""
        convs = [(n, m) for n, m in self.model.backbone.named_modules(prefix="backbone")
                 if isinstance(m, nn.Conv2d)][:layers]
        outputs: dict[str, np.ndarray] = {}
        hooks = [m.register_forward_hook(lambda _m, _i, out, name=n: outputs.__setitem__(
            name, out[0, :channels].detach().float().cpu().numpy())) for n, m in convs]
        image = self.transform(torch.from_numpy(self.load(path).transpose(2, 0, 1).copy()))
        try:
            with torch.no_grad():
                self.model(image.unsqueeze(0).to(self.run.device))
        finally:
            for hook in hooks:
                hook.remove()
        return [(n, outputs[n]) for n, _ in convs]


def explain_files(run, inputs: list[str | Path], out: Path, feature_maps: bool = False,
                  batch_size: int = 16) -> list[dict]:
    """Grad-CAM overlays (and feature-map grids) for image files/folders/globs, written into ``out``."""
    paths = expand_inputs(inputs)
    explainer = Explainer(run)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for start in range(0, len(paths), batch_size):
        for i, e in enumerate(explainer.explain(paths[start:start + batch_size]), start):
            name = f"{i:04d}_{Path(e.path).stem}"
            save_overlay(e, run.classes, out / f"{name}_gradcam.png")
            row = {"path": e.path, "explained_class": run.classes[e.target], "probability": float(e.probs[e.target]),
                   "overlay": f"{name}_gradcam.png", "layer": explainer.layer_name}
            if feature_maps:
                save_feature_maps(explainer.feature_maps(e.path), out / f"{name}_features.png")
                row["feature_maps"] = f"{name}_features.png"
            rows.append(row)
    return rows
