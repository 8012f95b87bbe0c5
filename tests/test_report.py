import json
import logging
import re
import shutil

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import imgclf
from browser import chromium_page
from clitools import run_main
from imgclf.cli import main
from imgclf.data.transforms import tta_views
from imgclf.errors import ConfigError, RunDirError
from imgclf.evaluation.evaluate import predict_probs
from imgclf.evaluation.predictions import Predictions
from imgclf.models.objective import Objective
from imgclf.reporting.explain import Explainer, cam_layer
from imgclf.reporting.html import write_report
from imgclf.runs import manifest
from imgclf.runs.base import load_run
from imgclf.runtime import Compute
from imgclf.workflows.ensemble import create_ensemble

from conftest import tiny_config
from imagefactory import make_class_folders


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory) -> imgclf.Run:
    """A screening-style binary run: threshold for 95% sensitivity, report written at the end."""
    base = tmp_path_factory.mktemp("binary")
    data = make_class_folders(base / "data", per_class=30, classes=["normal", "pneumonia"])
    return imgclf.train(tiny_config(data, base / "run", train={"epochs": 6},
                                    evaluate={"threshold": "sensitivity:0.95", "report": True, "bootstrap": 200}))


def test_threshold_is_chosen_on_val_saved_and_applied_to_test_and_predict(binary_run, tmp_path):
    saved = json.loads((binary_run.path / "threshold.json").read_text())
    assert saved["rule"] == "sensitivity:0.95" and saved["chosen_on"] == "val"
    t, val = saved["threshold"], Predictions.from_csv(binary_run.path / "predictions_val.csv")
    assert (val.probs[val.true == 1, 1] >= t).mean() >= 0.95  # the target holds where it was chosen
    test = Predictions.from_csv(binary_run.path / "predictions_test.csv")
    assert test.pred.tolist() == (test.probs[:, 1] >= t).astype(int).tolist()
    metrics = binary_run.metrics["test"]
    assert metrics["threshold"] == t
    assert metrics["sensitivity"] == ((test.pred == 1) & (test.true == 1)).sum() / (test.true == 1).sum()
    predicted = binary_run.predict([binary_run.index().abspath(0).parent], out=tmp_path / "p.csv")
    assert predicted.pred.tolist() == (predicted.probs[:, 1] >= t).astype(int).tolist()


def test_an_ensemble_decides_by_the_rule_its_first_member_decides_by_now(binary_run, tmp_path, caplog,
                                                                          monkeypatch):
    """``evaluate --threshold`` re-chooses in threshold.json, not config.yaml: the ensemble follows the file."""
    monkeypatch.setattr(logging.getLogger("imgclf"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="imgclf")
    rechosen, kept = tmp_path / "rechosen", tmp_path / "kept"
    for copy in (rechosen, kept):
        shutil.copytree(binary_run.path, copy, ignore=shutil.ignore_patterns("export"))
    load_run(rechosen).choose_threshold("youden")
    ensemble = create_ensemble([rechosen, kept], tmp_path / "ens")
    assert json.loads((ensemble.path / "threshold.json").read_text())["rule"] == "youden"
    assert yaml.safe_load((ensemble.path / "config.yaml").read_text())["evaluate"]["threshold"] == "youden"
    assert f"not as {kept} (positive class pneumonia, threshold sensitivity:0.95" in caplog.text


def test_metrics_carry_wilson_and_bootstrap_intervals(binary_run):
    m = binary_run.metrics["test"]
    ci = m["intervals"]
    for name, value in (("accuracy", m["accuracy"]), ("sensitivity", m["sensitivity"]),
                        ("specificity", m["specificity"])):
        assert ci[name][0] <= value <= ci[name][1]
    assert ci["auc_resamples"] == 200 and "ece" in m


def test_report_is_self_contained_and_holds_every_section(binary_run):
    page = (binary_run.path / "report.html").read_text()
    for section in ("summary", "dataset", "config", "training", "metrics", "plots-val", "plots-test", "gallery"):
        assert f'id="{section}"' in page, section
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing from the network
    assert page.count("data:image/png;base64,") >= 1 + 2 * 4  # curves, 4 plots per split, thumbnails
    assert "Grad-CAM" in page and "sensitivity:0.95" in page and "Wilson" in page


def test_report_command_rewrites_it_and_names_a_wrong_directory(binary_run, tmp_path, capsys):
    (binary_run.path / "report.html").unlink()
    assert main(["report", str(binary_run.path)]) == 0
    assert (binary_run.path / "report.html").is_file()
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run, cv or grid directory" in capsys.readouterr().err


def test_evaluate_can_rechoose_the_threshold_and_use_tta(binary_run, capsys):
    assert main(["evaluate", str(binary_run.path), "--threshold", "youden"]) == 0
    out = capsys.readouterr().out
    assert "threshold (youden, on val)" in out and "sensitivity=" in out
    assert json.loads((binary_run.path / "threshold.json").read_text())["rule"] == "youden"
    assert main(["evaluate", str(binary_run.path), "--tta", "flip"]) == 0  # scored with it, at the same threshold
    assert "scored with --tta flip, recorded in metrics.json" in capsys.readouterr().out
    assert json.loads((binary_run.path / "metrics.json").read_text())["test"]["tta"] == "flip"
    assert main(["evaluate", str(binary_run.path), "--threshold", "argmax"]) == 0
    assert not (binary_run.path / "threshold.json").exists()
    assert main(["evaluate", str(binary_run.path), "--threshold", "sometimes"]) == 2
    assert "--threshold: threshold must be argmax, max_f1, youden or sensitivity:S" in capsys.readouterr().err


def test_gradcam_points_at_the_bar_that_decides_the_class(binary_run):
    explainer = Explainer(binary_run)
    index = binary_run.index()
    paths = [index.abspath(i) for i in range(len(index))]
    explained = explainer.explain(paths, targets=[int(t) for t in index.targets])
    assert all(e.heatmap.shape == (16, 16) and e.heatmap.min() >= 0 and e.heatmap.max() <= 1 for e in explained)
    # class 0 is a left bar, class 1 a right bar: the heat should sit on the bar's side on average
    left = np.mean([e.heatmap[:, :8].mean() - e.heatmap[:, 8:].mean() for e in explained if e.target == 0])
    right = np.mean([e.heatmap[:, 8:].mean() - e.heatmap[:, :8].mean() for e in explained if e.target == 1])
    assert left > 0 and right > 0


def test_explain_decides_and_scores_as_the_run_predicts_with_its_test_time_views(binary_run, tmp_path):
    run_dir = tmp_path / "tta_run"
    shutil.copytree(binary_run.path, run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["evaluate"]["tta"] = "flip_shift"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    manifest.seal(run_dir)
    run = imgclf.load_run(run_dir)
    index = run.index()
    paths = [index.abspath(i) for i in range(len(index))]
    explained = Explainer(run).explain(paths)
    predicted, plain = run.predict(paths), run.predict(paths, tta="none")
    probs = np.stack([e.probs for e in explained])
    assert np.allclose(probs, predicted.probs, atol=1e-5) and not np.allclose(probs, plain.probs, atol=1e-5)
    assert [e.target for e in explained] == predicted.pred.tolist()


def test_explain_cli_writes_overlays_and_feature_maps(binary_run, tmp_path, capsys):
    folder = binary_run.index().abspath(0).parent
    assert main(["explain", str(binary_run.path), str(folder), "--out", str(tmp_path / "ex"), "--feature-maps"]) == 0
    overlays = sorted((tmp_path / "ex").glob("*_gradcam.png"))
    assert len(overlays) == len(list(folder.iterdir())) == len(list((tmp_path / "ex").glob("*_features.png")))
    maps = Explainer(binary_run).feature_maps(next(folder.iterdir()))  # the first two convolutions by default
    assert [name for name, _ in maps] == ["features.0: 8 of 8 channels", "features.4: 16 of 16 channels"]
    assert maps[0][1].shape == (8, 16, 16) and maps[1][1].shape == (16, 8, 8)
    one = str(sorted(folder.iterdir())[0])  # the first again, into the same folder: the others' figures are said
    result = run_main("explain", binary_run.path, one, "--out", tmp_path / "ex", "--overwrite")
    assert result.returncode == 0, result.stderr
    stale = 2 * len(overlays) - 1  # every figure but the one overlay written again
    assert f"warning: {stale} figure(s) in {tmp_path / 'ex'} are from an earlier explain, not of these images" \
        in result.stderr


def test_gradcam_finds_a_timm_cnn_layer_and_refuses_a_model_without_maps():
    timm = pytest.importorskip("timm")
    backbone = timm.create_model("resnet10t", num_classes=0)
    assert cam_layer(_wrap(backbone), (3, 32, 32))[0] == "backbone.layer3"  # layer4 is 1x1 at 32 px
    name, _ = cam_layer(_wrap(backbone), (3, 64, 64))
    assert name == "backbone.layer4"  # the last stage, the one before global pooling
    with pytest.raises(ConfigError, match="convolutional backbone"):
        cam_layer(_wrap(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))), (3, 8, 8))


def _wrap(backbone: nn.Module) -> nn.Module:
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = backbone

        def forward(self, x):
            return self.backbone(x)

    return Model().eval()


def test_tta_averages_the_probabilities_of_the_views():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    model[0].weight.data[..., 0] *= 3  # not mirror-symmetric: a flip changes the output
    images = torch.randn(5, 1, 16, 16)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(5), torch.arange(5)),
                                         batch_size=2)
    objective, compute = Objective(3), Compute(torch.device("cpu"))
    plain = predict_probs(model, objective, loader, compute)
    flipped = objective.probabilities(model(images.flip(-1))).detach().numpy()
    np.testing.assert_allclose(predict_probs(model, objective, loader, compute, "flip"), (plain + flipped) / 2,
                               rtol=1e-5)
    assert len(tta_views("flip_shift")) == 6
    shifted = tta_views("flip_shift")[2](images)
    assert shifted.shape == images.shape and not torch.equal(shifted, images)
    # 1/16 of 16 px is one pixel: the content moves one column right, the edge column repeats
    np.testing.assert_allclose(shifted[..., 1:].numpy(), images[..., :-1].numpy(), atol=1e-5)
    np.testing.assert_allclose(shifted[..., 0].numpy(), images[..., 0].numpy(), atol=1e-5)


def test_report_renders_in_headless_chromium(binary_run, tmp_path):
    write_report(binary_run.path)
    with chromium_page() as browsed:
        page = browsed.page
        page.goto((binary_run.path / "report.html").as_uri())
        page.wait_for_load_state("load")
        for section in ("summary", "dataset", "training", "metrics", "plots-test", "gallery"):
            assert page.locator(f"#{section}").is_visible(), section
        assert page.locator("#metrics table").first.is_visible()
        broken = page.evaluate("Array.from(document.images).filter(i => !i.complete || i.naturalWidth == 0).length")
        shown = page.evaluate("document.images.length")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert browsed.problems == [] and broken == 0 and shown >= 9
    assert all(url.startswith(("file:", "data:")) for url in browsed.requests)  # nothing from the network
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_cv_and_grid_directories_get_their_own_report(tmp_path, pool_dataset):
    from imgclf.workflows.cv import cross_validate
    from imgclf.workflows.grid import grid_search, parse_params

    on = {"report": True, "bootstrap": 50}
    cross_validate(tiny_config(pool_dataset, tmp_path / "cv", train={"epochs": 2}, evaluate=on), folds=3)
    page = (tmp_path / "cv" / "report.html").read_text()
    assert all(f'id="{s}"' in page for s in ("folds", "summary", "metrics")) and "out-of-fold" in page
    grid_search(tiny_config(pool_dataset, tmp_path / "g", train={"epochs": 2}, evaluate=on),
                parse_params(["lr=0.01,0.001"]))
    page = (tmp_path / "g" / "report.html").read_text()
    assert 'id="leaderboard"' in page and "param_<wbr>lr" in page and "Best trial on test" in page
    link = re.search(r'href="([^"#]+)"', page).group(1)  # to the best trial's own report
    assert 'id="plots-test"' in (tmp_path / "g" / link).read_text()
    (tmp_path / "cv" / "metrics_oof.json").unlink()  # a tampered experiment folder: said, not left out
    (tmp_path / "g" / "best.json").unlink()
    for folder in ("cv", "g"):
        write_report(tmp_path / folder)
    cv_page = (tmp_path / "cv" / "report.html").read_text()
    assert "metrics_oof.json is missing; re-run the cv or grid in that folder" in cv_page
    assert "best.json is missing; re-run the cv or grid" in (tmp_path / "g" / "report.html").read_text()
    (tmp_path / "cv" / "metrics_oof.json").write_text("{")
    with pytest.raises(RunDirError, match="metrics_oof.json is damaged .*; re-run the cv or grid in that folder"):
        write_report(tmp_path / "cv")


def test_gradcam_on_a_timm_run(tmp_path, pool_dataset):
    run = imgclf.train(tiny_config(pool_dataset, tmp_path / "resnet", model={"name": "resnet10t"},
                                   data={"image_size": 64}, train={"epochs": 1}))
    explainer = Explainer(run)
    assert explainer.layer_name == "backbone.layer4"
    explained = explainer.explain([run.index().abspath(0), run.index().abspath(1)])
    assert [e.heatmap.shape for e in explained] == [(64, 64), (64, 64)]
    assert all(e.heatmap.max() == pytest.approx(1.0) or e.heatmap.max() == 0 for e in explained)


def test_report_on_a_run_from_before_reports_existed(tmp_path, pool_dataset):
    run = imgclf.train(tiny_config(pool_dataset, tmp_path / "old", train={"epochs": 2}))
    metrics = json.loads((run.path / "metrics.json").read_text())
    metrics.pop("baselines")  # older runs had no baselines either
    for split in metrics.values():
        del split["ece"], split["intervals"], split["threshold"]
    (run.path / "metrics.json").write_text(json.dumps(metrics))
    for plot in run.path.glob("plots/*_*.png"):
        if plot.name.startswith(("pr_", "reliability_")):
            plot.unlink()
    (run.path / "manifest.json").unlink()  # no manifest or kind file then either
    (run.path / "run.json").unlink()
    dataset = json.loads((run.path / "dataset.json").read_text())
    del dataset["warnings"]
    (run.path / "dataset.json").write_text(json.dumps(dataset))
    page = write_report(run.path).read_text()
    assert (run.path / "plots" / "reliability_test.png").is_file() and 'id="gallery"' in page
