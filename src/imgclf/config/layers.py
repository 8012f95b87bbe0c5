"""The layer-list grammar of ``model.conv_layers`` and ``model.head_layers``, as text.

A Keras notebook's ``Sequential`` is written as a list of short items, one layer each::

    conv_layers: [conv 64 3 valid relu, dropout 0.25, pool max 2]
    head_layers: [flatten, bn, dense 256 relu, dropout 0.4]

Items (Keras's defaults where an argument is left out):

- ``conv FILTERS KERNEL [valid|same|PIXELS] [ACTIVATION] [nobias]``: Conv2D, stride 1. ``valid``
  (the default) pads nothing, ``same`` keeps the size (also for even kernels, as Keras pads them),
  a number pads that many pixels on each side. ``KERNEL`` is ``3`` or ``3x3``. ``nobias``: no bias.
- ``pool [max|avg] [SIZE]``: MaxPooling2D / AveragePooling2D (default max 2, stride = size).
- ``dense UNITS [ACTIVATION]``: Dense (head only).
- ``bn [keras|torch]``: BatchNormalization; ``keras`` (default) has momentum 0.99 and epsilon
  1e-3, ``torch`` PyTorch's 0.9 and 1e-5 (what the shorthand flags build).
- ``dropout P``; an activation alone (``relu``...), e.g. after ``bn``.
- ``flatten``, ``gap`` (GlobalAveragePooling2D), ``gmp`` (GlobalMaxPooling2D): how the feature map
  becomes a vector; the head's first item (``--pool`` supplies it when the list has none).

Activations: relu, elu, gelu, tanh, sigmoid, none (Keras's default: linear). The final classifier
layer is not listed: imgclf adds it (one unit per class, or one with ``binary_head: sigmoid``).

This module is text only (no torch), so a bad item is a one-line ConfigError when the config is
read; ``imgclf.models.layers`` turns the parsed items into modules. It also writes the lists the
shorthand flags (``--conv-filters``, ``--dense-layers``...) stand for, exactly the networks those
flags built before the lists existed, and recognises such a list again (``contract_*``), so a
shorthand flag given on top of a run's config.yaml rebuilds the list instead of being refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from imgclf.errors import ConfigError

ACTIVATIONS = ("relu", "elu", "gelu", "tanh", "sigmoid", "none")
VECTOR_ITEMS = {"flatten": "flatten", "gap": "avg", "gmp": "max"}  # item -> the pool shorthand's value
POOL_ITEM = {pool: item for item, pool in VECTOR_ITEMS.items()}
CONV_KINDS = ("conv", "pool", "bn", "dropout", *ACTIVATIONS[:-1])
HEAD_KINDS = ("dense", "bn", "dropout", *ACTIVATIONS[:-1], *VECTOR_ITEMS)
MAX_KERNEL = 31


@dataclass(frozen=True)
class Item:
    """One parsed layer: ``kind`` and its arguments, always complete (defaults filled in)."""

    kind: str
    size: int = 0  # conv filters, dense units, pool size
    kernel: int = 0
    padding: str = ""  # valid, same, or a pixel count
    activation: str = "none"
    bias: bool = True
    rate: float = 0.0  # dropout
    flavour: str = "keras"  # bn

    def text(self) -> str:
        """The canonical spelling, as config.yaml records it."""
        if self.kind == "conv":
            return (f"conv {self.size} {self.kernel} {self.padding} {self.activation}"
                    + ("" if self.bias else " nobias"))
        if self.kind == "pool":
            return f"pool {self.padding} {self.size}"
        if self.kind == "dense":
            return f"dense {self.size} {self.activation}"
        if self.kind == "bn":
            return f"bn {self.flavour}"
        if self.kind == "dropout":
            return f"dropout {self.rate:g}"
        return self.kind


def parse_item(text: object, where: str) -> Item:
    """``'conv 32 3 same relu'`` -> Item; anything else is a one-line error naming ``where``."""
    words = str(text).lower().replace(",", " ").split() if isinstance(text, str | int | float) else []
    if not words:
        raise ConfigError(f"{where} {text!r} is empty or not text; e.g. 'dense 256 relu'")
    kind, args = words[0], words[1:]
    try:
        return _PARSERS[kind](args) if kind in _PARSERS else _bare(kind, args)
    except ValueError as err:
        raise ConfigError(f"{where} {text!r}: {err}") from None


def _conv(args: list[str]) -> Item:
    if len(args) < 2:
        raise ValueError("write conv FILTERS KERNEL [valid|same|PIXELS] [activation] [nobias], e.g. conv 32 3 relu")
    size, kernel = _count(args[0], "filters"), _kernel(args[1])
    padding, activation, bias = "valid", "none", True
    for word in args[2:]:
        if word in ("valid", "same") or word.isdigit():
            padding = word
        elif word in ACTIVATIONS:
            activation = word
        elif word == "nobias":
            bias = False
        else:
            raise ValueError(f"{word!r} is not a padding (valid, same, pixels), an activation "
                             f"({', '.join(ACTIVATIONS)}) or nobias")
    return Item("conv", size, kernel, padding, activation, bias)


def _pool(args: list[str]) -> Item:
    mode = args[0] if args and args[0] in ("max", "avg") else "max"
    rest = args[1:] if args and args[0] in ("max", "avg") else args
    if len(rest) > 1:
        raise ValueError("write pool [max|avg] [SIZE], e.g. pool max 2")
    return Item("pool", _count(rest[0], "pool size") if rest else 2, padding=mode)


def _dense(args: list[str]) -> Item:
    if not args or len(args) > 2:
        raise ValueError("write dense UNITS [activation], e.g. dense 256 relu")
    activation = args[1] if len(args) == 2 else "none"
    if activation not in ACTIVATIONS:
        hint = "; the final classifier is added by imgclf, leave it out" if activation == "softmax" else ""
        raise ValueError(f"unknown activation {activation!r}; use one of {', '.join(ACTIVATIONS)}{hint}")
    return Item("dense", _count(args[0], "units"), activation=activation)


def _bn(args: list[str]) -> Item:
    if args not in ([], ["keras"], ["torch"]):
        raise ValueError("write bn, bn keras (momentum 0.99, epsilon 1e-3) or bn torch (0.9, 1e-5)")
    return Item("bn", flavour=args[0] if args else "keras")


def _dropout(args: list[str]) -> Item:
    try:
        rate = float(args[0]) if len(args) == 1 else -1.0
    except ValueError:
        rate = -1.0
    if not 0 <= rate < 1:
        raise ValueError("write dropout P with 0 <= P < 1, e.g. dropout 0.25")
    return Item("dropout", rate=rate)


def _bare(kind: str, args: list[str]) -> Item:
    if kind not in (*ACTIVATIONS[:-1], *VECTOR_ITEMS):
        known = "conv, pool, dense, bn, dropout, flatten, gap, gmp or an activation (relu, elu, gelu, tanh, sigmoid)"
        raise ValueError(f"unknown layer {kind!r}; use {known}")
    if args:
        raise ValueError(f"{kind} takes no arguments")
    return Item(kind)


_PARSERS = {"conv": _conv, "pool": _pool, "dense": _dense, "bn": _bn, "dropout": _dropout}


def _count(word: str, what: str) -> int:
    if not word.isdigit() or int(word) < 1:
        raise ValueError(f"{what} must be a whole number of at least 1 (got {word!r})")
    return int(word)


def _kernel(word: str) -> int:
    side, _, other = word.partition("x")
    if other and other != side:
        raise ValueError(f"kernel {word!r}: only square kernels (3 or 3x3)")
    kernel = _count(side, "kernel")
    if kernel > MAX_KERNEL:
        raise ValueError(f"kernel {kernel} is larger than {MAX_KERNEL}")
    return kernel


def parse_layers(items: list[str], field: str) -> list[Item]:
    """Every item of ``model.<field>`` parsed, and placed where its list allows it."""
    allowed = CONV_KINDS if field == "conv_layers" else HEAD_KINDS
    parsed = []
    for i, text in enumerate(items):
        item = parse_item(text, f"model.{field}[{i}]")
        if item.kind not in allowed:
            home = "head_layers" if field == "conv_layers" else "conv_layers (simple_cnn)"
            raise ConfigError(f"model.{field}[{i}] {text!r}: {item.kind} belongs in model.{home}")
        if item.kind in VECTOR_ITEMS and i:
            raise ConfigError(f"model.{field}[{i}] {text!r}: {item.kind} turns the feature map into a vector, "
                              "so it must be the head's first item")
        parsed.append(item)
    return parsed


# --- the shorthand flags as lists ------------------------------------------------------------------------------

CONV_DEFAULTS = {"conv_filters": [32, 64, 128], "kernel_size": 3, "conv_dropout": 0.0, "conv_batchnorm": True}
HEAD_DEFAULTS = {"pool": "avg", "dense_layers": [], "dropout": 0.2, "head_batchnorm": False}


def expand_conv(conv_filters: list[int], kernel_size: int, conv_dropout: float, conv_batchnorm: bool) -> list[str]:
    """Blocks of conv -> [bn] -> relu -> max-pool 2 -> [dropout]: the simple CNN the flags always built.

    Its convolutions keep the size (k // 2 pixels each side; one more pixel for an even kernel, as
    before) and drop their bias when BatchNorm follows; BatchNorm has PyTorch's settings.
    """
    padding = "same" if kernel_size % 2 else str(kernel_size // 2)
    layers = []
    for filters in conv_filters:
        if conv_batchnorm:
            layers += [f"conv {filters} {kernel_size} {padding} none nobias", "bn torch", "relu"]
        else:
            layers.append(f"conv {filters} {kernel_size} {padding} relu")
        layers.append("pool max 2")
        if conv_dropout:
            layers.append(f"dropout {conv_dropout:g}")
    return layers


def expand_head(pool: str, dense_layers: list[int], dropout: float, head_batchnorm: bool) -> list[str]:
    """[pool] -> [bn] -> (dropout -> dense relu)* -> dropout: the head the flags always built."""
    layers = [POOL_ITEM[pool]] + (["bn torch"] if head_batchnorm else [])
    for width in dense_layers:
        layers += [f"dropout {dropout:g}", f"dense {width} relu"]
    return [*layers, f"dropout {dropout:g}"]


def contract_conv(layers: list[str]) -> dict | None:
    """The shorthand values whose expansion is exactly ``layers`` (canonical items), or None."""
    batchnorm = len(layers) > 1 and layers[1] == "bn torch"
    block = 4 if batchnorm else 2
    rates = {float(t.split()[1]) for t in layers if t.startswith("dropout ")}
    if len(rates) > 1:
        return None
    rate = rates.pop() if rates else 0.0
    block += 1 if rate else 0
    first = layers[0].split() if layers else []
    if len(layers) % block or len(first) < 3 or first[0] != "conv" or not first[2].isdigit():
        return None
    filters = [int(t.split()[1]) for t in layers[::block] if t.startswith("conv ") and t.split()[1].isdigit()]
    values = {"conv_filters": filters, "kernel_size": int(first[2]), "conv_dropout": rate,
              "conv_batchnorm": batchnorm}
    return values if expand_conv(**values) == layers else None


def contract_head(layers: list[str]) -> dict | None:
    """The shorthand values whose expansion is exactly ``layers`` (canonical items), or None."""
    if len(layers) < 2 or layers[0] not in VECTOR_ITEMS or not layers[-1].startswith("dropout "):
        return None
    batchnorm = layers[1] == "bn torch"
    widths = [int(t.split()[1]) for t in layers if t.startswith("dense ") and t.split()[1].isdigit()]
    values = {"pool": VECTOR_ITEMS[layers[0]], "dense_layers": widths, "dropout": float(layers[-1].split()[1]),
              "head_batchnorm": batchnorm}
    return values if expand_head(**values) == layers else None


# --- settling a model section: the lists it records ----------------------------------------------------------

SIMPLE_CNN = "simple_cnn"


def settle_conv(values: dict, simple_cnn: bool) -> list[str] | None:
    """``conv_layers`` as config.yaml records it: the list given, or the shorthand's expansion.

    A timm model has no conv layers: a list that is only the default expansion (left over from a
    simple_cnn config) is dropped; anything the user set is kept, and ignored with a warning at
    the start of training (``imgclf.models.networks.warn_unused``).
    """
    given = {k: values[k] for k in CONV_DEFAULTS if values.get(k) is not None}
    listed = values.get("conv_layers")
    items = None if listed is None else [i.text() for i in parse_layers(listed, "conv_layers")]
    if not simple_cnn:
        return None if items is None or (items == expand_conv(**CONV_DEFAULTS) and not given) else items
    if items is None:
        return expand_conv(**{**CONV_DEFAULTS, **given})
    if not any(t.startswith("conv ") for t in items):
        raise ConfigError("model.conv_layers has no conv item; simple_cnn needs at least one, e.g. 'conv 32 3 relu'")
    return items if not given else _rebuilt(items, given, "conv_layers", contract_conv, expand_conv)


def settle_head(values: dict) -> list[str]:
    """``head_layers`` as config.yaml records it, starting with how the feature map becomes a vector."""
    given = {k: values[k] for k in HEAD_DEFAULTS if values.get(k) is not None}
    listed = values.get("head_layers")
    if listed is None:
        return expand_head(**{**HEAD_DEFAULTS, **given})
    items = [i.text() for i in parse_layers(listed, "head_layers")]
    if not items or items[0] not in VECTOR_ITEMS:
        items = [POOL_ITEM[given.get("pool", HEAD_DEFAULTS["pool"])], *items]
    clash = {k: v for k, v in given.items() if k != "pool" or POOL_ITEM[v] != items[0]}
    return items if not clash else _rebuilt(items, given, "head_layers", contract_head, expand_head)


def _rebuilt(items: list[str], given: dict, field: str, contract, expand) -> list[str]:
    """A shorthand flag on top of a list: rebuild a list the flags wrote; refuse to edit one written by hand."""
    shorthand = contract(items)
    if shorthand is None:
        flags = ", ".join(f"{k}={v}" for k, v in given.items())
        raise ConfigError(f"model.{field} is a hand-written list and {flags} would change it; set these layers in "
                          f"one place: edit {field} (--{field.replace('_', '-')}), or remove it to build "
                          "them from the flags")
    return expand(**{**shorthand, **given})
