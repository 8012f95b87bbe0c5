"""Models: a timm backbone or a simple CNN, under a head, both written as Keras layer lists.

``Classifier = backbone -> Head``. The backbone returns what Keras's ``include_top=False`` returns:
the last feature map (timm's ``forward_features``; the simple CNN's ``conv_layers``). Layers timm
puts between that map and its classifier (VGG's fc6/fc7, MobileNetV3's conv_head, ConvNeXt's head
norm) are dropped unless ``pre_logits``. A model whose features are tokens or channels-last (ViT,
Swin) is pooled by its own rule and hands the head a vector. The head makes a vector (flatten, gap,
gmp), runs ``head_layers``, then the final linear classifier.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
from torch import nn

from imgclf.config import ModelConfig
from imgclf.config.layers import SIMPLE_CNN
from imgclf.errors import ConfigError
from imgclf.logs import get_logger
from imgclf.models.layers import conv_stack, head_stack, smallest_side, training_order, vector_width
from imgclf.models.weights import load_pretrained as fill

log = get_logger("model")

SIMPLE_CNN_DEFAULT_SIZE = 64
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TIMM_POOL = {"flatten": "", "gap": "avg", "gmp": "max"}  # head's first item -> timm's global_pool (pre_logits)


@dataclass(frozen=True)
class Preprocess:
    """What an input image must look like for the model; saved with the weights."""

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return asdict(self)


class SimpleCNN(nn.Module):
    """``conv_layers`` in order, e.g. Keras's conv -> dropout -> max-pool blocks.

    Training runs each ReLU -> max-pool pair as max-pool -> ReLU (``training_order``: exactly the same
    numbers, a quarter of the ReLU's work); evaluation runs the layers as written, so what hooks see (the
    summary, Grad-CAM, feature maps) is the Keras order.
    """

    def __init__(self, in_chans: int, conv_layers: list[str]):
        super().__init__()
        self.features, self.num_features = conv_stack(conv_layers, in_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.features(x)
        for module in training_order(list(self.features)):
            x = module(x)
        return x


class Head(nn.Module):
    """``head_layers`` (the first one makes the vector) -> the final linear classifier."""

    def __init__(self, head_layers: list[str], in_features: int, out_features: int):
        super().__init__()
        self.pool, self.hidden, width = head_stack(head_layers, in_features)
        self.fc = nn.Linear(width, out_features)

    def pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(self.pool(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pre_logits(x))


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, head: Head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (the input of the final linear layer)."""
        return self.head.pre_logits(self.backbone(x))


@dataclass
class Backbone:
    """A built backbone, the shape it outputs for one image, and what was cut from it (for the log)."""

    module: nn.Module
    shape: tuple[int, ...]
    dropped: dict[str, int] = field(default_factory=dict)  # module name -> parameters
    pools_itself: bool = False


def output_units(cfg: ModelConfig, num_classes: int) -> int:
    return 1 if num_classes == 2 and cfg.binary_head == "sigmoid" else num_classes


def check_model_name(name: str) -> None:
    if name == SIMPLE_CNN:
        return
    import timm  # imported only for timm models: it costs seconds at start-up

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, [SIMPLE_CNN, *timm.list_models()], n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models() or use simple_cnn"
    raise ConfigError(f"unknown model {name!r}{hint}")


def build_backbone(cfg: ModelConfig, channels: int, size: int) -> Backbone:
    """The backbone, probed with one zero image of ``size`` px (the probe also finds the layers to cut)."""
    check_model_name(cfg.name)
    if cfg.name == SIMPLE_CNN:
        module: nn.Module = SimpleCNN(channels, cfg.conv_layers or [])
    elif cfg.pre_logits:  # timm's own forward without the classifier, as runs before 0.2 were built
        import timm

        pool = TIMM_POOL[cfg.head_layers[0]] if cfg.head_layers else "avg"
        module = timm.create_model(cfg.name, pretrained=False, num_classes=0, global_pool=pool, in_chans=channels)
    else:
        return _cut_timm_backbone(cfg.name, channels, size)
    return Backbone(module, _probe(module, channels, size))


def _probe(module: nn.Module, channels: int, size: int) -> tuple[int, ...]:
    """The output shape for one zero image, run in eval mode so no BatchNorm statistic moves."""
    was_training = module.training
    with torch.no_grad():
        shape = tuple(module.eval()(torch.zeros(1, channels, size, size)).shape)
    module.train(was_training)
    return shape


def _cut_timm_backbone(name: str, channels: int, size: int) -> Backbone:
    """A timm model whose forward is its ``forward_features``; the modules that forward never calls dropped."""
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=channels)
    model.forward = partial(_features_forward, model)  # on the instance (picklable): modules keep timm's names
    called: set[str] = set()
    hooks = [module.register_forward_hook(lambda *_, n=module_name: called.add(n))
             for module_name, module in model.named_modules() if module_name]
    try:
        shape = _probe(model, channels, size)
    finally:
        for hook in hooks:
            hook.remove()
    unused = {n: m for n, m in model.named_modules() if n and n not in called
              and n.rpartition(".")[0] in called | {""} and any(True for _ in m.parameters())}
    _replace(model, dict.fromkeys(unused, nn.Identity()))
    try:
        _probe(model, channels, size)
    except (AttributeError, RuntimeError):  # a module used without being called (rare): keep everything
        _replace(model, unused)
        unused = {}
    return Backbone(model, shape, {n: sum(p.numel() for p in m.parameters()) for n, m in unused.items()},
                    len(shape) == 2)


def _replace(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    for module_name, module in modules.items():
        outer, _, leaf = module_name.rpartition(".")
        setattr(model.get_submodule(outer) if outer else model, leaf, module)


def _features_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Keras include_top=False: the last feature map; tokens and NHWC maps pooled by the model's own rule."""
    features = self.forward_features(x)
    if features.ndim == 4 and getattr(self, "output_fmt", "NCHW") == "NCHW":
        return features
    return self.forward_head(features, pre_logits=True)


def build_model(cfg: ModelConfig, num_classes: int, preprocess: Preprocess,
                load_pretrained: bool = False) -> Classifier:
    """The classifier; with ``load_pretrained`` the backbone starts from ``cfg.pretrained``/``cfg.weights``."""
    backbone = build_backbone(cfg, preprocess.channels, preprocess.size)
    if load_pretrained and (cfg.pretrained or cfg.weights):
        source = fill(backbone.module, cfg.name, cfg.weights, cfg.weights_map)
        log.info("pretrained weights: %s", source)
    head_layers = cfg.head_layers or ["gap"]
    head = Head(head_layers, vector_width(head_layers[0], backbone.shape), output_units(cfg, num_classes))
    return Classifier(backbone.module, head)


def resolve_preprocess(cfg: ModelConfig, image_size: int | None, channels: int,
                       interpolation: str | None = None) -> Preprocess:
    """Input size, mean, std and resize filter: the user's if given, else the model's own data config.

    ``normalize`` picks mean/std (inputs are first scaled to [0, 1]): ``model`` the timm model's own
    (simple_cnn has none, so rescale), ``imagenet``, ``rescale`` (x/255 only, as Keras notebooks do;
    simple_cnn's default), ``none`` (std 1/255 undoes the scaling: 0..255 floats).
    """
    normalize = cfg.normalize or ("rescale" if cfg.name == SIMPLE_CNN else "model")
    data: dict = {}
    if cfg.name != SIMPLE_CNN:
        check_model_name(cfg.name)
        import timm

        pretrained_cfg = timm.get_pretrained_cfg(cfg.name)
        data = pretrained_cfg.to_dict() if pretrained_cfg else {}
    mean, std = _mean_std(normalize, data, channels)
    default_size = SIMPLE_CNN_DEFAULT_SIZE if cfg.name == SIMPLE_CNN else int(data.get("input_size", (3, 224))[-1])
    own = data.get("interpolation", "bilinear")
    own = own if own in ("bilinear", "bicubic", "nearest") else "bilinear"
    return Preprocess(image_size or default_size, channels, mean, std, interpolation or own)


def _mean_std(normalize: str, data: dict, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if normalize == "rescale" or (normalize == "model" and not data):
        return (0.0,) * channels, (1.0,) * channels
    if normalize == "none":
        return (0.0,) * channels, (1 / 255,) * channels
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if normalize == "model":
        mean, std = tuple(data.get("mean", mean)), tuple(data.get("std", std))
    if channels == 1:  # a grayscale input: the channels' average
        return (sum(mean) / len(mean),), (sum(std) / len(std),)
    return tuple(mean), tuple(std)


def check_input_size(cfg: ModelConfig, preprocess: Preprocess, layer_flags: bool = True) -> None:
    """Refuse an image size the network cannot take, before a run directory exists; log what was built.

    The simple CNN is checked by arithmetic; a timm backbone is built without weights and run on one
    zero image, so a vanishing feature map or a fixed-size model (ViT) fails here as one line. The fix it
    names includes the layer flags only where the command takes them (``layer_flags``).
    """
    size = preprocess.size
    warn_unused(cfg)
    if any(item.split()[0] in ("conv", "dense") for item in (cfg.conv_layers or []) + (cfg.head_layers or [])):
        log.info("model: conv and dense layers start from PyTorch's initialisation (Keras: Glorot-uniform); "
                 "the layers and parameter counts are Keras's")
    if cfg.name == SIMPLE_CNN:
        smallest = smallest_side(cfg.conv_layers or [])
        if smallest is None or size < smallest:
            blocks = sum(item.startswith("conv ") for item in cfg.conv_layers or [])
            fix = f"--image-size {smallest} or more" if smallest else "a larger --image-size"
            layers = ", or fewer pooling layers or --conv-filters" if layer_flags else ""
            raise ConfigError(f"image_size {size} is too small for simple_cnn with {blocks} conv blocks (their "
                              f"feature map vanishes); use {fix}{layers}")
        return
    try:
        backbone = build_backbone(cfg, preprocess.channels, size)
    except (RuntimeError, AssertionError, ValueError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0][:160]
        raise ConfigError(f"image_size {size} does not fit {cfg.name} ({reason}); use the model's own (leave "
                          "--image-size unset) or another size it takes") from None
    if 0 in backbone.shape:
        raise ConfigError(f"image_size {size} is too small for {cfg.name}: its feature map vanishes; "
                          "use a larger --image-size, e.g. the model's own (leave --image-size unset)")
    _log_cut(cfg, backbone)


def _log_cut(cfg: ModelConfig, backbone: Backbone) -> None:
    if backbone.dropped:
        dropped = ", ".join(f"{name} ({count:,} parameters)" for name, count in backbone.dropped.items())
        log.info("%s: cut at its last feature map, as Keras include_top=False; dropped %s (--pre-logits keeps "
                 "them)", cfg.name, dropped)
    if backbone.pools_itself:
        log.info("%s: its features are tokens or channels-last, pooled by the model's own rule into a vector; "
                 "the head's %s has nothing left to pool", cfg.name, (cfg.head_layers or ["gap"])[0])


def warn_unused(cfg: ModelConfig) -> None:
    """Settings the chosen model has no use for are named, never dropped in silence."""
    conv = [n for n in ("conv_layers", "conv_filters", "kernel_size", "conv_dropout", "conv_batchnorm")
            if getattr(cfg, n) is not None]
    if cfg.name != SIMPLE_CNN and conv:
        log.warning("warning: model.%s describe simple_cnn's layers; %s is a timm backbone and ignores them",
                    ", model.".join(conv), cfg.name)
    if cfg.name == SIMPLE_CNN and cfg.pre_logits:
        log.warning("warning: model.pre_logits applies to timm models; simple_cnn ignores it")
    if cfg.name == SIMPLE_CNN and cfg.normalize == "model":  # it rescaled, silently
        raise ConfigError("--normalize model takes a timm model's own mean and std; simple_cnn has none: give "
                          "rescale (its default, x/255), imagenet or none")
