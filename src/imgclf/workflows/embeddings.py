"""``imgclf features``: penultimate-layer embeddings of every image of a dataset, as one .npz file.

The source is a run directory (its trained model and preprocessing) or a backbone name (timm, with
``--pretrained`` or ``--weights``). The file holds ``features`` (N x D float32), ``labels`` (class
index per image), ``classes``, ``paths`` (relative to ``root``) and ``splits``: what scikit-learn,
UMAP or a notebook needs, with no imgclf import.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgclf import atomic
from imgclf.config import DataConfig, ModelConfig
from imgclf.data.datasets import CachedImages, make_loader
from imgclf.data.index import build_index
from imgclf.data.pipeline import prepare
from imgclf.data.transforms import build_eval_transform
from imgclf.errors import ConfigError, RunDirError
from imgclf.logs import get_logger
from imgclf.models.networks import build_model, check_input_size, check_model_name, resolve_preprocess
from imgclf.runs.base import load_run
from imgclf.runs.files import read_dataset
from imgclf.runs.heads import Embedder, embed
from imgclf.runtime import Compute

log = get_logger("features")


def write_features(source: str | Path, data: str | Path | None, out: str | Path, image_size: int | None = None,
                   channels: int | None = None, pretrained: bool = False, weights: str | None = None,
                   batch_size: int = 64) -> dict:
    """Embed every image of ``data`` (default: a run's own dataset) with ``source``; write ``out`` (.npz).

    ``image_size``, ``channels``, ``pretrained`` and ``weights`` describe a backbone given by name; a run
    embeds as it was trained, and is refused them rather than quietly ignoring them."""
    if (Path(source) / "config.yaml").is_file():
        given = [flag for flag, value in (("--image-size", image_size), ("--channels", channels),
                                          ("--pretrained", pretrained), ("--weights", weights)) if value]
        if given:
            raise ConfigError(f"features {source}: a run embeds with its own trained weights and input; drop "
                              f"{', '.join(given)} (they are for a backbone given by name)")
        run = load_run(source)
        root = Path(read_dataset(run.path / "dataset.json").root)
        if data is None and not root.is_dir():
            raise RunDirError(f"dataset folder {root} is gone; give where it is now: imgclf features {source} "
                              "NEW_LOCATION --out ...")
        model, preprocess, compute = run.model, run.preprocess, run.compute
        data_cfg = run.config.data
        seed = run.config.train.seed if data_cfg.split_seed is None else data_cfg.split_seed
        if data and data_cfg.group_column:  # the run's CSV column; another dataset is split at random
            log.warning("warning: features %s %s: the run's --group-column %s is its own CSV's; these images are "
                        "split at random", source, data, data_cfg.group_column)
        other = data_cfg.model_copy(update={"path": str(data), "group_column": None})
        index = build_index(other, seed) if data else run.index()
    else:
        if data is None:
            raise ConfigError("pass the dataset to embed: imgclf features MODEL DATA --out feats.npz")
        try:
            check_model_name(str(source))
        except ConfigError:
            if Path(source).is_dir():  # a folder, not a model name: not a run either
                raise ConfigError(f"features {source}: a folder, but not a run directory (no config.yaml); give a "
                                  "run directory or a model name") from None
            raise
        if pretrained and weights:  # as train refuses them: one would be dropped
            raise ConfigError(f"--pretrained and --weights {weights} both give the backbone's weights; keep one")
        cfg = ModelConfig(name=str(source), pretrained=pretrained, weights=weights)
        channels = channels or 3
        preprocess = resolve_preprocess(cfg, image_size, channels)
        check_input_size(cfg, preprocess, layer_flags=False)  # one line, as in train; features takes no layers
        compute = Compute.resolve("auto", "auto", None)
        if not (pretrained or weights):
            log.warning("warning: features %s without --pretrained or --weights: the backbone's weights are random",
                        source)
        model = compute.prepare(build_model(cfg, 2, preprocess, load_pretrained=True)).eval()  # head never used
        data_cfg = DataConfig(path=str(data), image_size=image_size, channels=channels)
        index = build_index(data_cfg, data_cfg.split_seed)  # train's default split of the same folder
    prepared = prepare(index, preprocess, data_cfg)
    index = prepared.index
    dataset = CachedImages(prepared.decoded.file, prepared.cache_rows, index.targets,
                           build_eval_transform(preprocess.mean, preprocess.std))
    features = embed(Embedder(model), make_loader(dataset, batch_size, workers=data_cfg.workers), compute)[0]
    arrays = {"features": features, "labels": index.targets, "classes": np.array(index.classes),
              "paths": np.array([str(p) for p in index.paths]), "splits": np.array(index.splits),
              "root": np.array(str(index.root))}
    with atomic.atomic_path(out) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    return {"images": len(features), "dim": int(features.shape[1]) if features.size else 0, "out": str(out)}
