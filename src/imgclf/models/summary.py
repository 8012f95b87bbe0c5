"""A Keras ``model.summary()`` for a built classifier: layers, output shapes and parameter counts.

The table comes from torchinfo (one traced forward pass; no hand-written shape arithmetic). The
counts are Keras's, so they can be checked against a notebook: BatchNorm's moving mean and
variance count as non-trainable parameters (Keras: 4 x C per BatchNorm, 2 x C of them
non-trainable), and so does every weight the freeze policy leaves frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchinfo
from torch import nn

from imgclf.models.freeze import NORM_TYPES, apply_freeze, weighted_layers

# A PyTorch module -> the Keras layer that does the same, for the ``keras_layers`` sequence.
KERAS_NAMES = {"Conv2d": "Conv2D", "Linear": "Dense", "BatchNorm1d": "BatchNormalization",
               "BatchNorm2d": "BatchNormalization", "Dropout": "Dropout", "MaxPool2d": "MaxPooling2D",
               "AvgPool2d": "AveragePooling2D", "Flatten": "Flatten", "GlobalAvgPool2d": "GlobalAveragePooling2D",
               "GlobalMaxPool2d": "GlobalMaxPooling2D"}
ACTIVATION_TYPES = (nn.ReLU, nn.ELU, nn.GELU, nn.Tanh, nn.Sigmoid)


@dataclass(frozen=True)
class Counts:
    """Parameter counts as Keras reports them."""

    trainable: int
    non_trainable: int  # frozen weights + BatchNorm moving statistics

    @property
    def total(self) -> int:
        return self.trainable + self.non_trainable


@dataclass(frozen=True)
class Row:
    name: str
    kind: str
    shape: tuple[int, ...]
    counts: Counts


def keras_counts(module: nn.Module) -> Counts:
    """Trainable and non-trainable counts of ``module`` and everything inside it, as Keras counts them."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    moving = sum(m.running_mean.numel() + m.running_var.numel() for m in module.modules()
                 if isinstance(m, NORM_TYPES) and getattr(m, "running_mean", None) is not None)
    return Counts(trainable, frozen + moving)


def layer_rows(model: nn.Module, input_shape: tuple[int, int, int], depth: int = 3) -> list[Row]:
    """The layers of one forward pass down to ``depth`` levels (deeper modules counted in their parent)."""
    names = {id(m): n for n, m in model.named_modules()}
    stats = torchinfo.summary(model, input_size=(1, *input_shape), depth=depth, verbose=0, device="cpu",
                              mode="eval")
    rows, seen = [], set()
    for info in stats.summary_list:
        module, name = info.module, names.get(id(info.module), "")
        level = name.count(".") + 1 if name else 0
        # a norm layer is one row even where it holds its activation as a child (timm's BatchNormAct2d)
        whole = isinstance(module, NORM_TYPES) or not any(True for _ in module.children())
        inside = any(name.startswith(f"{row.name}.") for row in rows[-1:])  # within the row just made
        if not name or id(module) in seen or level > depth or inside or not (whole or level == depth):
            continue
        seen.add(id(module))
        shape = tuple(info.output_size) if isinstance(info.output_size, list | tuple) else ()
        rows.append(Row(name, type(module).__name__, shape, keras_counts(module)))
    return rows


def keras_layers(model: nn.Module, input_shape: tuple[int, int, int]) -> list[str]:
    """The Keras layers that would build ``model``, in the order one forward pass runs its leaf modules.

    An activation right after a Conv2D or Dense is that layer's ``activation=`` argument, any other one
    an ``Activation`` layer; a module with no Keras twin keeps its PyTorch name.
    """
    ran: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda module, *_: ran.append(module)) for m in model.modules()
             if not any(True for _ in m.children()) and not isinstance(m, nn.Identity)]
    try:
        was_training = model.training
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
        model.train(was_training)
    finally:
        for hook in hooks:
            hook.remove()
    layers: list[str] = []
    for i, module in enumerate(ran):
        kind = type(module).__name__
        if not isinstance(module, ACTIVATION_TYPES):
            layers.append(KERAS_NAMES.get(kind, kind))
        elif i and isinstance(ran[i - 1], nn.Conv2d | nn.Linear):
            layers[-1] += f"({kind.lower()})"
        else:
            layers.append(f"Activation({kind.lower()})")
    return layers


def format_table(rows: list[Row], counts: Counts) -> str:
    """The table as ``model.summary()`` prints it; shapes are PyTorch's (batch, channels, height, width)."""
    width = max([len(f"{r.name} ({r.kind})") for r in rows] + [30]) + 2
    rule = "=" * (width + 52)
    lines = [f"{'Layer (type)':<{width}}{'Output Shape (N,C,H,W)':<24}{'Param #':>14}{'Trainable':>14}", rule]
    for row in rows:
        shape = "(None, " + ", ".join(str(s) for s in row.shape[1:]) + ")" if row.shape else "-"
        lines.append(f"{f'{row.name} ({row.kind})':<{width}}{shape:<24}{row.counts.total:>14,}"
                     f"{row.counts.trainable:>14,}")
    return "\n".join([*lines, rule, f"Total params: {counts.total:,}", f"Trainable params: {counts.trainable:,}",
                      f"Non-trainable params: {counts.non_trainable:,} (frozen weights, and BatchNorm moving "
                      "mean and variance as Keras counts them)"])


def freeze_positions(backbone: nn.Module) -> list[str]:
    """The backbone's layers with weights, each with its ``last:N`` position (norm layers have none)."""
    layers = weighted_layers(backbone)
    counted = [n for n, m in layers if not isinstance(m, NORM_TYPES)]
    lines = [f"layers with weights ({len(counted)} count for last:N; normalisation layers do not):"]
    for name, module in layers:
        from_end = "" if isinstance(module, NORM_TYPES) else f"last:{len(counted) - counted.index(name)}"
        params = sum(p.numel() for p in module.parameters(recurse=False))
        lines.append(f"  {name:<40} {type(module).__name__:<22} {params:>10,}  {from_end}")
    return lines


def describe_model(model: nn.Module, input_shape: tuple[int, int, int], stages: list[tuple[str, str, bool]],
                   depth: int = 3) -> str:
    """The summary table under the first stage's freeze policy, each stage's counts, and the freeze positions.

    ``stages``: (name, freeze policy, freeze_bn) per training stage, in order.
    """
    counts = []
    for name, policy, freeze_bn in reversed(stages):  # the table shows the first stage, so it is applied last
        apply_freeze(model, policy, freeze_bn)
        counts.insert(0, f"  {name:<12} freeze={policy}{' freeze_bn' if freeze_bn else ''}: "
                         f"{keras_counts(model).trainable:,} trainable, {keras_counts(model).non_trainable:,} not")
    table = format_table(layer_rows(model, input_shape, depth), keras_counts(model))
    return "\n".join([table, "", "trainable per stage (the table shows the first):", *counts, "",
                      *freeze_positions(model.backbone)])
