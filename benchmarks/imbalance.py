"""Which loss weighting the default should use on imbalanced data, measured: none, balanced class
weights, or class-balanced sampling, for the small CNN and the linear probe, over seeds.

On the imbalanced Fashion-MNIST subsample of benchmarks/realsets.py (150/60/30/12/4 training
images), it prints test macro-F1 (mean and min over seeds) and the recall of the 4-image class.
A choice that collapses (macro-F1 far below 'none', or a class never predicted) is visible at once.

    python benchmarks/imbalance.py [--seeds 0,1,2] [--models "small CNN,linear probe"]

Measured 2026-11-29 (seeds 0,1,2; 2 cores; --models "linear probe,fine-tuned EfficientNet-Lite0,small CNN";
the s/run column is not comparable: other work shared the machine). Test macro-F1 mean / min, recall of 'bag':

    model                          none               balanced class weights   class-balanced sampling
    linear probe                   0.611 0.611 0.00   0.697 0.697 0.33         (does not apply)
    fine-tuned EfficientNet-Lite0  0.657 0.535 0.33   0.718 0.661 0.56         0.646 0.566 0.22
    small CNN                      0.555 0.493 0.00   0.715 0.700 0.67         0.709 0.695 0.67

Balanced class weights are best for every candidate and collapse for none, so the default's
candidates use them (``workflows/candidates.py``) unless --class-weight or --sampler is given.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import realsets

import imgclf
from imgclf.workflows.candidates import candidate_config

WEIGHTINGS = {"none": {}, "balanced class weights": {"class_weight": "balanced"},
              "class-balanced sampling": {"sampler": "weighted"}}


def one_run(data: Path, out: Path, model: str, weighting: dict, seed: int) -> dict:
    base = imgclf.build_config({"data": {"path": str(data)}, "train": {"seed": seed, **weighting}, "out": str(out),
                                "evaluate": {"report": False, "baseline": False, "bootstrap": 0}})
    start = time.perf_counter()
    run = imgclf.train(candidate_config(base, model, out, pretrained_size=96))
    test = run.metrics["test"]
    return {"f1": test["f1_macro"], "tiny_recall": test["per_class"]["bag"]["recall"],
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--models", default="small CNN,linear probe")
    args = parser.parse_args()
    logging.getLogger("imgclf").setLevel(logging.WARNING)
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("IMGCLF_CACHE_DIR", str(tmp / "cache"))
        data = realsets.fashion(tmp / "fashion")
        print(f"imbalanced Fashion-MNIST (150/60/30/12/4 train), seeds {seeds}, {os.cpu_count()} CPU cores")
        print(f"{'model':<14} {'weighting':<24} {'test macro-F1 mean':>18} {'min':>6} {'bag recall':>10} {'s/run':>6}")
        for model in args.models.split(","):
            for name, weighting in WEIGHTINGS.items():
                if model == "linear probe" and "sampler" in weighting:
                    continue  # a scikit-learn head sees every image at once: sampling does not apply
                runs = [one_run(data, tmp / f"{model}-{name}-{seed}", model, weighting, seed) for seed in seeds]
                f1 = [r["f1"] for r in runs]
                print(f"{model:<14} {name:<24} {sum(f1) / len(f1):>18.3f} {min(f1):>6.3f} "
                      f"{sum(r['tiny_recall'] for r in runs) / len(runs):>10.2f} "
                      f"{sum(r['seconds'] for r in runs) / len(runs):>6.1f}", flush=True)


if __name__ == "__main__":
    main()
