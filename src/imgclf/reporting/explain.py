"""What the model looks at: Grad-CAM heatmaps and feature maps (the first two convolutions', or the layers
named by ``--layers``: module names as ``model-info`` lists them, or Keras VGG names such as ``block1_conv1``).

Grad-CAM comes from Captum (``LayerGradCam``), PyTorch's own interpretability library: it works
on any module of any ``nn.Module``, needs nothing beyond torch, numpy and matplotlib (grad-cam
pulls in OpenCV), and offers other attributions (Integrated Gradients, occlusion) from the same
API. The layer is found, not configured: the last module inside the backbone whose output is still
a spatial map (``N x C x H x W``, larger than 1 x 1), found by one traced forward pass. That is the last stage or
``conv_head`` of a timm CNN and the last block of the simple CNN; a model with no such layer (a
vision transformer) gets a clear error.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imgclf.data.images import load_image
from imgclf.data.inputs import expand_inputs
from imgclf.data.transforms import build_eval_transform, tta_views
from imgclf.errors import ConfigError
from imgclf.evaluation.predictions import Predictions
from imgclf.logs import get_logger
from imgclf.reporting.plots import save_feature_maps, save_overlay
from imgclf.runs.heads import ClassicalRun
from imgclf.safeio import cut_name

log = get_logger("explain")
MAX_STEM_BYTES = 150  # of an image's name, kept in the names of its figures (a name holds 255 bytes)
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh)


@dataclass(frozen=True)
class Explanation:
    path: str
    image: np.ndarray  # H x W x C uint8, as the model saw it
    target: int  # the class explained
    probs: np.ndarray  # K probabilities
    heatmap: np.ndarray  # H x W in [0, 1]


def spatial_layers(model: nn.Module, image_shape: tuple[int, int, int]) -> list[tuple[str, nn.Module]]:
    """Backbone modules whose output is a spatial map, in the order they finish in a forward pass.

    The backbone itself and pass-through modules (an identity pool, whose output is its input) are left
    out: they repeat the map of the layer that made it, which is the one to name.
    """
    found: list[tuple[str, nn.Module]] = []

    def record(name: str, module: nn.Module, inputs: tuple, out) -> None:
        spatial = isinstance(out, torch.Tensor) and out.ndim == 4 and min(out.shape[2:]) > 1
        if spatial and not any(out is x for x in inputs):
            found.append((name, module))

    hooks = [module.register_forward_hook(lambda mod, inputs, out, name=name: record(name, mod, inputs, out))
             for name, module in model.backbone.named_modules(prefix="backbone") if name != "backbone"]
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
        probs = self.probabilities(batch)
        chosen = list(targets) if targets is not None else self.decide(probs)
        with torch.enable_grad():
            attribution = self.cam.attribute(batch, target=chosen, relu_attributions=True)
        heat = torch.nn.functional.interpolate(attribution.detach().float(), size=batch.shape[2:],
                                               mode="bilinear", align_corners=False)[:, 0].cpu().numpy()
        peak = heat.reshape(len(heat), -1).max(1).reshape(-1, 1, 1)
        heat = np.divide(heat, peak, out=np.zeros_like(heat), where=peak > 0)
        return [Explanation(str(p), a, t, pr, h) for p, a, t, pr, h in
                zip(paths, images, chosen, probs, heat, strict=True)]

    @torch.no_grad()
    def probabilities(self, batch: torch.Tensor) -> np.ndarray:
        """The run's probabilities, as ``predict`` gives them: averaged over its test-time views (config.yaml's
        ``evaluate.tta``), so the class explained is the one the run decides. Grad-CAM maps the image as given."""
        views = tta_views(self.run.config.evaluate.tta)
        total = sum(self.run.objective.probabilities(self.model(view(batch))) for view in views)
        return (total / len(views)).cpu().numpy()

    def decide(self, probs: np.ndarray) -> list[int]:
        """The run's decisions: its binary threshold where it has one, else the most probable class."""
        preds = Predictions([""] * len(probs), self.run.classes, np.full(len(probs), -1), probs)
        return preds.at_threshold(self.run.threshold, self.run.positive).pred.tolist()

    def feature_maps(self, path: str | Path, layers: list[tuple[str, str]] | None = None,
                     channels: int = 16) -> list[tuple[str, np.ndarray]]:
        """Outputs of ``layers`` ((shown name, backbone module name), from ``resolve_layers``; default: the
        first two convolutions) for one image: (title, ``channels x h x w``), the first ``channels`` channels."""
        chosen = layers or [(n, n) for n, m in self.model.backbone.named_modules() if isinstance(m, nn.Conv2d)][:2]
        modules = dict(self.model.backbone.named_modules())
        outputs: dict[str, torch.Tensor] = {}

        def keep(name: str, out: torch.Tensor) -> None:  # a copy now: an in-place ReLU may change it next
            outputs.setdefault(name, out[0].detach().float().cpu().clone())

        hooks = [modules[name].register_forward_hook(lambda _m, _i, out, name=name: keep(name, out))
                 for _, name in chosen]
        image = self.transform(torch.from_numpy(self.load(path).transpose(2, 0, 1).copy()))
        try:
            with torch.no_grad():
                self.model(image.unsqueeze(0).to(self.run.device))
        finally:
            for hook in hooks:
                hook.remove()
        maps = []
        for shown, name in chosen:
            out = outputs[name]
            if out.ndim != 3:
                raise ConfigError(f"--layers {shown}: its output has shape {tuple(out.shape)}, not a feature map; "
                                  "choose a convolutional layer")
            title = shown if shown == name else f"{shown} ({name})"
            maps.append((f"{title}: {min(channels, len(out))} of {len(out)} channels", out[:channels].numpy()))
        return maps

    def resolve_layers(self, names: list[str]) -> list[tuple[str, str]]:
        """(name as given, backbone module name) per name: a module name as ``model-info`` lists it (with or
        without ``backbone.``), or a Keras VGG name (``block1_conv1``) where the backbone is a plain chain."""
        modules = {n for n, _ in self.model.backbone.named_modules() if n}
        aliases = keras_names(self.model.backbone)
        resolved = []
        for given in names:
            name = given.removeprefix("backbone.")
            if name not in modules and name not in aliases:
                close = close_names(name, modules | set(aliases))
                hint = f"close names: {', '.join(close)}" if close else "none is close"
                raise ConfigError(f"--layers {given}: {self.run.config.model.name} has no layer of that name "
                                  f"({hint}; imgclf model-info {self.run.config.model.name} lists them)")
            resolved.append((given, name if name in modules else aliases[name]))
            if name not in modules:
                after = isinstance(self.model.backbone.get_submodule(aliases[name]), ACTIVATIONS)
                log.info("%s is %s%s", given, aliases[name],
                         " (the activation after the convolution: a Keras conv layer's output)" if after else "")
        return resolved


def close_names(name: str, candidates: set[str], n: int = 4) -> list[str]:
    """The ``n`` names most like ``name``; equally close ones in sorted order (features.0 before features.5)."""
    scored = [(difflib.SequenceMatcher(None, name, c).ratio(), c) for c in candidates]
    return [c for score, c in sorted(scored, key=lambda sc: (-sc[0], sc[1])) if score >= 0.5][:n]


def keras_names(backbone: nn.Module) -> dict[str, str]:
    """Keras VGG names -> module names, for a backbone whose convolutions are a plain chain (VGG, simple CNN).

    The chain is the ``nn.Sequential`` holding the first convolution; each max/avg pool ends a block, as
    Keras numbers them (``block1_conv1``, ``block1_conv2``, ``block1_pool``, ``block2_conv1``...). A Keras
    conv layer outputs after its activation, so its name points at the activation that follows the
    convolution where there is one. Other backbones (ResNet, DenseNet...) get no Keras names.
    """
    first = next((n for n, m in backbone.named_modules() if isinstance(m, nn.Conv2d)), None)
    parent_name = (first or "").rpartition(".")[0]
    parent = backbone.get_submodule(parent_name) if parent_name else backbone
    if first is None or not isinstance(parent, nn.Sequential):
        return {}
    children = [(f"{parent_name}.{n}" if parent_name else n, m) for n, m in parent.named_children()]
    names, block, conv = {}, 1, 0
    for i, (name, module) in enumerate(children):
        if isinstance(module, nn.Conv2d):
            conv += 1
            following = children[i + 1] if i + 1 < len(children) else None
            activated = following is not None and isinstance(following[1], ACTIVATIONS)
            names[f"block{block}_conv{conv}"] = following[0] if activated else name
        elif isinstance(module, nn.MaxPool2d | nn.AvgPool2d):
            names[f"block{block}_pool"] = name
            block, conv = block + 1, 0
    return names


def explain_files(run, inputs: list[str | Path], out: Path, feature_maps: bool = False,
                  batch_size: int = 16, layers: list[str] | None = None) -> list[dict]:
    """Grad-CAM overlays (and feature-map grids of ``layers``, default the first two convolutions) for
    image files/folders/globs, written into ``out``."""
    if layers and not feature_maps:
        raise ConfigError("--layers chooses the layers of the feature maps; add --feature-maps")
    paths = expand_inputs(inputs)
    explainer = Explainer(run)
    chosen = explainer.resolve_layers(layers) if layers else None  # a wrong name fails before any file is written
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for start in range(0, len(paths), batch_size):
        for i, e in enumerate(explainer.explain(paths[start:start + batch_size]), start):
            name = f"{i:04d}_{cut_name(Path(e.path).stem, MAX_STEM_BYTES)}"  # room for the suffixes
            save_overlay(e, run.classes, out / f"{name}_gradcam.png")
            row = {"path": e.path, "explained_class": run.classes[e.target], "probability": float(e.probs[e.target]),
                   "overlay": f"{name}_gradcam.png", "layer": explainer.layer_name}
            if feature_maps:
                save_feature_maps(explainer.feature_maps(e.path, chosen), out / f"{name}_features.png")
                row["feature_maps"] = f"{name}_features.png"
            rows.append(row)
    _say_stale(out, {name for row in rows for key, name in row.items() if key in ("overlay", "feature_maps")})
    return rows


def _say_stale(out: Path, written: set[str]) -> None:
    """--overwrite replaces same-named figures only: an earlier explain's others are said, not mixed in silently."""
    stale = sorted(p.name for p in out.glob("[0-9][0-9][0-9][0-9]_*.png") if p.name not in written)
    if stale:
        log.warning("warning: %d figure(s) in %s are from an earlier explain, not of these images (e.g. %s); "
                    "delete them or use another --out", len(stale), out, stale[0])
