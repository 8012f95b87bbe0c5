"""Models: a timm backbone or a configurable simple CNN, under a configurable head.

``Classifier = backbone -> Head``. The backbone returns a feature map (simple CNN, timm with
``pool=flatten``) or a pooled vector (timm with avg/max pooling, which handles every timm
architecture, ViTs included). The head pools if needed, then BatchNorm / dropout / dense layers.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass

import torch
from torch import nn

from imgclf.config import ModelConfig
from imgclf.errors import ConfigError
from imgclf.logs import get_logger
from imgclf.models.weights import load_pretrained as fill

log = get_logger("model")

SIMPLE_CNN = "simple_cnn"
SIMPLE_CNN_DEFAULT_SIZE = 64


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
    """Blocks of conv(k) -> [BatchNorm] -> ReLU -> max-pool(2) -> [dropout], as users build in Keras."""

    def __init__(self, in_chans: int, filters: list[int], kernel_size: int = 3, batchnorm: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        for out_chans in filters:
            layers.append(nn.Conv2d(in_chans, out_chans, kernel_size, padding=kernel_size // 2, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm2d(out_chans))
            layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            in_chans = out_chans
        self.features = nn.Sequential(*layers)
        self.num_features = filters[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class Head(nn.Module):
    """[pool or flatten] -> [BatchNorm] -> (dropout -> dense -> ReLU)* -> dropout -> linear."""

    def __init__(self, in_features: int, out_features: int, pool: str = "avg", dense: list[int] | None = None,
                 dropout: float = 0.0, batchnorm: bool = False):
        super().__init__()
        self.pool = pool
        layers: list[nn.Module] = [nn.BatchNorm1d(in_features)] if batchnorm else []
        for width in dense or []:
            layers += [nn.Dropout(dropout), nn.Linear(in_features, width), nn.ReLU(inplace=True)]
            in_features = width
        self.hidden = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, out_features)

    def pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            if self.pool == "avg":
                x = x.mean(dim=(2, 3))
            elif self.pool == "max":
                x = x.amax(dim=(2, 3))
        return self.hidden(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.pre_logits(x)))


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


def build_backbone(cfg: ModelConfig, channels: int) -> nn.Module:
    check_model_name(cfg.name)
    if cfg.name == SIMPLE_CNN:
        return SimpleCNN(channels, cfg.conv_filters, cfg.kernel_size, cfg.conv_batchnorm, cfg.conv_dropout)
    import timm

    global_pool = "" if cfg.pool == "flatten" else cfg.pool
    return timm.create_model(cfg.name, pretrained=False, num_classes=0, global_pool=global_pool, in_chans=channels)


def build_model(cfg: ModelConfig, num_classes: int, preprocess: Preprocess,
                load_pretrained: bool = False) -> Classifier:
    """The classifier; with ``load_pretrained`` the backbone starts from ``cfg.pretrained``/``cfg.weights``."""
    backbone = build_backbone(cfg, preprocess.channels)
    if load_pretrained and (cfg.pretrained or cfg.weights):
        source = fill(backbone, cfg.name, cfg.weights, cfg.weights_map)
        log.info("pretrained weights: %s", source)
    with torch.no_grad():  # the head's input width, e.g. C*H*W for flatten
        was_training = backbone.training
        backbone.eval()
        probe = backbone(torch.zeros(1, preprocess.channels, preprocess.size, preprocess.size))
        backbone.train(was_training)
    in_features = probe.flatten(1).shape[1] if cfg.pool == "flatten" or probe.ndim == 2 else probe.shape[1]
    head = Head(in_features, output_units(cfg, num_classes), cfg.pool, cfg.dense_layers, cfg.dropout,
                cfg.head_batchnorm)
    return Classifier(backbone, head)


def resolve_preprocess(cfg: ModelConfig, image_size: int | None, channels: int,
                       interpolation: str | None = None) -> Preprocess:
    """Input size, mean, std and resize filter: the user's if given, else the model's own data config."""
    if cfg.name == SIMPLE_CNN:  # Keras users' convention: rescale to [0, 1]
        return Preprocess(image_size or SIMPLE_CNN_DEFAULT_SIZE, channels, (0.0,) * channels, (1.0,) * channels,
                          interpolation or "bilinear")
    check_model_name(cfg.name)
    import timm

    pretrained_cfg = timm.get_pretrained_cfg(cfg.name)
    data = pretrained_cfg.to_dict() if pretrained_cfg else {}
    mean, std = tuple(data.get("mean", (0.485, 0.456, 0.406))), tuple(data.get("std", (0.229, 0.224, 0.225)))
    if channels == 1:
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    size = image_size or int(data.get("input_size", (3, 224, 224))[-1])
    own = data.get("interpolation", "bilinear")
    own = own if own in ("bilinear", "bicubic", "nearest") else "bilinear"
    return Preprocess(size, channels, mean, std, interpolation or own)


def simple_cnn_feature_size(size: int, blocks: int, kernel_size: int) -> int:
    """Side of the simple CNN's last feature map: each block's conv keeps the size (+1 for an even
    kernel), its 2x2 max-pool halves it; 0 means the map vanished and the network cannot run."""
    for _ in range(blocks):
        size = (size + 2 * (kernel_size // 2) - kernel_size + 1) // 2
        if size < 1:
            return 0
    return size


def check_input_size(cfg: ModelConfig, preprocess: Preprocess) -> None:
    """Refuse an image size the network cannot take, before a run directory exists.

    The simple CNN is checked by arithmetic; a timm backbone is built without weights and run on one
    zero image, so a vanishing feature map or a fixed-size model (ViT) fails here as one line.
    """
    size = preprocess.size
    if cfg.name == SIMPLE_CNN:
        blocks = len(cfg.conv_filters)
        if simple_cnn_feature_size(size, blocks, cfg.kernel_size) < 1:
            smallest = 1  # walk back from a 1 px map: a pool doubles it, an even kernel's conv adds 1 px
            for _ in range(blocks):
                smallest = max(1, 2 * smallest - (1 - cfg.kernel_size % 2))
            raise ConfigError(f"image_size {size} is too small for simple_cnn with {blocks} conv blocks (each "
                              f"halves it); use --image-size {smallest} or more, or fewer --conv-filters")
        return
    backbone = build_backbone(cfg, preprocess.channels).eval()
    try:
        with torch.no_grad():
            features = backbone(torch.zeros(1, preprocess.channels, size, size))
    except (RuntimeError, AssertionError, ValueError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0][:160]
        raise ConfigError(f"image_size {size} does not fit {cfg.name} ({reason}); use a larger --image-size, "
                          "e.g. the model's own (leave --image-size unset)") from None
    if features.numel() == 0:
        raise ConfigError(f"image_size {size} is too small for {cfg.name}: its feature map vanishes; "
                          "use a larger --image-size, e.g. the model's own (leave --image-size unset)")
