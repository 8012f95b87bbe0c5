"""Issue 19, items 6 and 3: a report a person can read at a glance, with the run next to its baselines.

The figures are checked from their own settings (size in pixels at the saved DPI, every text's point size),
the page in headless Chromium (each figure shown at its natural width up to the page's, nothing wider than
the window), and the numbers by the page's one format rule.
"""

import json
import re
import shutil
import warnings

import numpy as np
import pytest
from matplotlib.text import Text
from PIL import Image

from browser import chromium_page
from imgclf.evaluation.predictions import Predictions
from imgclf.reporting import evalplots, plots
from imgclf.reporting.baselines import baseline_lines
from imgclf.reporting.format import fmt
from imgclf.reporting.html import write_report

READABLE_PX = 10  # the smallest text a person reads on a report without zooming


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """The shared trained run, copied: its report and plots are rewritten here, not in the shared one."""
    shutil.copytree(trained_run.path, tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def drawn(monkeypatch) -> dict:
    """Figures keyed by file name, kept open instead of saved, so their settings can be read."""
    figures: dict = {}
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.__setitem__(path.name, fig))
    yield figures
    plots.plt.close("all")


def text_px(fig) -> list[tuple[str, float]]:
    """(text, height in screen pixels at the figure's natural size) of every visible text of a drawn figure."""
    fig.canvas.draw()  # tick labels exist once drawn
    return [(t.get_text(), t.get_fontsize() * plots.DPI / 72) for t in fig.findobj(Text)
            if t.get_visible() and t.get_text().strip()]


def width_px(fig) -> float:
    return fig.get_size_inches()[0] * plots.DPI


def predictions(classes: list[str], n: int = 40, seed: int = 0) -> Predictions:
    rng = np.random.default_rng(seed)
    true = rng.integers(0, len(classes), n)
    probs = rng.dirichlet(np.ones(len(classes)), n)
    probs[np.arange(n), true] += 1
    return Predictions([f"img{i}.png" for i in range(n)], classes, true, probs / probs.sum(axis=1, keepdims=True))


@pytest.mark.parametrize("classes", [["covid", "normal", "pneumonia"],
                                     [f"a rather long class name {k}" for k in range(12)]])
def test_each_figure_fits_the_page_and_its_text_is_readable(drawn, tmp_path, caplog, classes):
    preds = predictions(classes)
    cm = np.zeros((len(classes), len(classes)), dtype=int)
    np.add.at(cm, (preds.true, preds.probs.argmax(axis=1)), 1)
    evalplots.plot_evaluation(preds, {"confusion_matrix": cm.tolist(), "ece": 0.1}, tmp_path, "val")
    history = [{"epoch": e, "stage": "head" if e < 3 else "finetune", "train_loss": 1 / e, "val_loss": 1.1 / e,
                **{f"{s}_{m}": e / 6 for s in ("train", "val") for m in ("accuracy", "auc", "balanced_accuracy",
                                                                       "f1_macro", "precision_macro",
                                                                       "recall_macro")}} for e in range(1, 6)]
    plots.plot_curves(history, tmp_path / "curves.png", best_epoch=4)
    assert set(drawn) == {"confusion_val.png", "roc_val.png", "pr_val.png", "reliability_val.png", "curves.png"}
    for name, fig in drawn.items():
        assert width_px(fig) <= plots.PAGE_WIDTH_PX + 0.5, name  # shown 1:1 on the page, never shrunk
        smallest = min(text_px(fig), key=lambda pair: pair[1])
        assert smallest[1] >= READABLE_PX, (name, smallest)
    confusion = drawn["confusion_val.png"]
    digits = [t for t in confusion.findobj(Text) if re.fullmatch(r"\d+(\.\d{3})?", t.get_text())]
    assert len(digits) >= 2 * len(classes) ** 2  # every cell of both panels, in the page's number format
    assert not [r for r in caplog.records if "too small" in r.getMessage()]  # nothing left out
    curves = drawn["curves.png"]
    titles = [ax.get_title() for ax in curves.axes]  # a panel per metric, none empty: 7 of the 3 x 3 cells
    assert titles == ["loss", "accuracy", "auc", "balanced accuracy", "f1 macro", "precision macro", "recall macro"]
    assert curves.get_suptitle() == "Training curves" and curves._suptitle.get_horizontalalignment() == "left"
    assert len(curves.legends) == 1 and all(ax.get_legend() is None for ax in curves.axes)  # one legend


@pytest.mark.parametrize(("classes", "left_out"), [
    ([f"a rather long class name {k}" for k in range(30)], "numbers"),
    ([f"a rather long class nam{k:02d}" for k in range(57)], "numbers and class names"),  # 24 characters
    ([f"c{k}" for k in range(1000)], "numbers and class names"),  # an ImageNet-sized run
])
def test_a_confusion_matrix_of_many_classes_stays_one_column_wide_and_says_what_it_left_out(
        drawn, tmp_path, caplog, classes, left_out):
    n = len(classes)
    cm = np.random.default_rng(0).integers(0, 5, (n, n))
    evalplots.plot_confusion(cm, classes, tmp_path / "confusion_val.png", "val")
    fig = drawn["confusion_val.png"]
    assert width_px(fig) <= plots.PAGE_WIDTH_PX + 0.5  # however many classes: not 0.4 in a cell (44,000 px)
    assert fig.get_size_inches()[1] * plots.DPI <= 2 * plots.PAGE_WIDTH_PX + 100  # two panels, one above the other
    assert min(px for _, px in text_px(fig)) >= READABLE_PX
    assert not [t for t in fig.findobj(Text) if re.fullmatch(r"\d+(\.\d{3})?", t.get_text())]  # no cell numbers
    tick_names = {t.get_text() for ax in fig.axes for t in ax.get_yticklabels()}
    assert (classes[0] in tick_names) == (left_out == "numbers")
    warnings = [r.getMessage() for r in caplog.records if "confusion_val.png" in r.getMessage()]
    assert len(warnings) == 1 and f"{n} classes leave its cells too small for their {left_out}" in warnings[0]
    assert "metrics.json's confusion_matrix" in warnings[0]


@pytest.mark.parametrize("classes", [[f"n{k}" for k in range(10)], [f"x{k}" for k in range(25)],
                                     [f"a rather long class name {k}" for k in range(3)],
                                     [f"a rather long class name {k}" for k in range(12)]])
def test_no_confusion_matrix_is_cut_off_at_the_png_edges(tmp_path, classes):
    """Fixed-aspect images made constrained layout swing between passes: the 'true' label was cut at the left."""
    n = len(classes)
    evalplots.plot_confusion(np.random.default_rng(1).integers(0, 50, (n, n)), classes, tmp_path / "c.png", "val")
    gray = np.asarray(Image.open(tmp_path / "c.png").convert("L"))
    frame = np.concatenate([gray[:, :2].ravel(), gray[:, -2:].ravel(), gray[:2].ravel(), gray[-2:].ravel()])
    assert (frame >= 200).all()  # nothing dark within 2 px of an edge: no text runs off the picture


def test_a_layout_that_leaves_text_outside_the_figure_gets_another_pass(tmp_path, monkeypatch):
    draws = []
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    real_draw = FigureCanvasAgg.draw
    monkeypatch.setattr(FigureCanvasAgg, "draw", lambda canvas: draws.append(1) or real_draw(canvas))
    fig, ax = plots.plt.subplots(layout="constrained")
    ax.plot([0, 1])
    plots.save_figure(fig, tmp_path / "fits.png")
    assert len(draws) == 1
    fig, ax = plots.plt.subplots(layout="constrained")
    fig.text(-0.2, 0.5, "outside")  # no layout brings it in: every pass is tried, then the PNG written
    plots.save_figure(fig, tmp_path / "cut.png")
    assert len(draws) == 1 + plots.LAYOUT_PASSES and (tmp_path / "cut.png").is_file()


@pytest.mark.parametrize("n", [5, 30])
def test_roc_and_pr_name_at_most_eight_classes_the_lowest_scoring_and_say_so(drawn, tmp_path, caplog, n):
    from sklearn.metrics import roc_auc_score

    preds = predictions([f"class {k}" for k in range(n)], n=20 * n)
    evalplots.plot_roc(preds, tmp_path / "roc_val.png", "val")
    evalplots.plot_pr(preds, tmp_path / "pr_val.png", "val")
    aucs = {c: roc_auc_score(preds.true == k, preds.probs[:, k]) for k, c in enumerate(preds.classes)}
    lowest = sorted(aucs, key=aucs.get)[:evalplots.NAMED_CURVES]
    legend = [t.get_text().split(" (")[0] for t in drawn["roc_val.png"].axes[0].get_legend().get_texts()]
    assert sorted(legend) == sorted(lowest)  # every class when they fit, else the 8 to look at
    for name in ("roc_val.png", "pr_val.png"):
        ax = drawn[name].axes[0]
        curves = [line for line in ax.get_lines() if len(line.get_xdata()) > 2]  # not the guides
        assert len(curves) == n
        grey = [line for line in curves if line.get_color() == evalplots.GREY_CURVE["color"]]
        assert len(grey) == n - len(lowest) and curves[:len(grey)] == grey  # drawn first, under the named
        assert len(ax.get_legend().get_texts()) == len(lowest)
    for name, what in (("roc_val.png", "AUC"), ("pr_val.png", "AP")):  # the figure says it, not 2 warnings a run
        title = drawn[name].axes[0].get_legend().get_title().get_text()
        assert title == (f"the 8 lowest {what} of {n}; others grey" if n > evalplots.NAMED_CURVES else "")
    assert "legend" not in caplog.text


def _curves(path):
    history = [{"epoch": e, "stage": "head", "train_loss": 1 / e, "val_loss": 1.1 / e, "train_accuracy": e / 6,
                "val_accuracy": e / 7} for e in range(1, 6)]
    plots.plot_curves(history, path, best_epoch=4)


def _confusion(path):
    classes = [f"a rather long class name {k}" for k in range(5)]
    preds = predictions(classes)
    cm = np.zeros((5, 5), dtype=int)
    np.add.at(cm, (preds.true, preds.probs.argmax(axis=1)), 1)
    evalplots.plot_confusion(cm, classes, path, "val")


def _feature_maps(path):
    maps = [("conv 1", np.random.default_rng(0).random((6, 12, 12))), ("conv 2", np.ones((3, 6, 6)))]
    plots.save_feature_maps(maps, path)


@pytest.mark.parametrize("draw", [_curves, _confusion, _feature_maps])
def test_a_saved_figure_is_pixel_for_pixel_what_savefig_writes(tmp_path, monkeypatch, draw):
    """``save_figure`` lays the figure out once instead of savefig's twice; the PNG must not change."""
    draw(tmp_path / "ours.png")
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: fig.savefig(path, dpi=plots.DPI, format="png"))
    draw(tmp_path / "savefig.png")
    ours, theirs = (np.asarray(Image.open(tmp_path / name)) for name in ("ours.png", "savefig.png"))
    assert ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)
    assert Image.open(tmp_path / "ours.png").info["dpi"] == pytest.approx((plots.DPI, plots.DPI), abs=0.01)


def test_empty_reliability_bins_are_left_out_not_drawn_at_zero(drawn, tmp_path):
    bins = [{"low": k / 10, "high": (k + 1) / 10, "count": 0, "confidence": None, "accuracy": None}
            for k in range(10)]
    bins[6].update(count=5, confidence=0.65, accuracy=0.6)
    bins[9].update(count=3, confidence=0.95, accuracy=1.0)
    evalplots.plot_reliability(bins, 0.05, tmp_path / "r.png", "val")
    top, bottom = drawn["r.png"].axes
    points = next(line for line in top.lines if line.get_marker() == "o")
    assert list(points.get_xdata()) == [0.65, 0.95] and list(points.get_ydata()) == [0.6, 1.0]
    assert [bar.get_x() for bar in top.patches] == [0.6, 0.9]
    assert [bar.get_x() for bar in bottom.patches] == [0.6, 0.9]


def test_one_number_format_on_the_whole_page(run_copy):
    assert [fmt(v) for v in (0.98483, 1.0, "0.8333", "1.0", 18, "155315271", None, float("nan"), "resnet")] == \
        ["0.985", "1.000", "0.833", "1.000", "18", "155315271", "n/a", "n/a", "resnet"]
    page = write_report(run_copy).read_text()
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", page) + re.findall(r"<li>([^<]*)</li>", page)
    decimals = {len(d) for cell in cells for d in re.findall(r"\d\.(\d+)", cell)}
    assert decimals == {3}, decimals  # 0.985 never next to 0.9848


def test_the_report_shows_every_figure_at_its_natural_width_in_chromium(run_copy, tmp_path):
    cv = make_wide_cv_directory(tmp_path / "cv", run_copy / "plots" / "curves.png")
    write_report(run_copy)
    write_report(cv)
    with chromium_page(width=1280) as browsed:
        page = browsed.page
        page.goto((run_copy / "report.html").as_uri())
        page.wait_for_load_state("load")
        shown = page.evaluate("""Array.from(document.images).filter(i => !i.closest('.case')).map(i =>
            ({alt: i.alt, natural: i.naturalWidth, shown: i.getBoundingClientRect().width,
              room: i.closest('section').getBoundingClientRect().width}))""")
        run_width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        page.goto(cv.joinpath("report.html").as_uri())
        page.wait_for_load_state("load")
        cv_width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        folds_scroll = page.evaluate("(() => { const d = document.querySelector('#folds .scroll');"
                                     " return [d.scrollWidth, d.clientWidth]; })()")
    assert browsed.problems == []
    assert {s["alt"] for s in shown} >= {"training curves", "confusion_val", "confusion_test"}
    for s in shown:
        assert s["shown"] >= min(s["natural"], s["room"]) - 0.5, s  # natural width, up to the page's
        assert s["natural"] <= plots.PAGE_WIDTH_PX, s
    assert run_width[0] <= run_width[1] and cv_width[0] <= cv_width[1]  # nothing wider than the window
    assert folds_scroll[0] > folds_scroll[1]  # the wide folds table scrolls inside its box


def make_wide_cv_directory(path, png):
    """A cross-validation directory whose folds table is far wider than any page (long paths, many columns)."""
    (path / "plots").mkdir(parents=True)
    shutil.copy(png, path / "plots" / "folds.png")
    columns = [f"{s}_{m}" for s in ("val", "test") for m in ("accuracy", "f1_macro", "balanced_accuracy",
                                                             "roc_auc_ovr", "precision_macro", "recall_macro")]
    rows = [",".join([str(k), f"/a/very/long/directory/name/for/the/cross/validation/fold_{k}", "42", "3.07",
                      *(f"{0.8 + k / 100:.4f}" for _ in columns)]) for k in range(5)]
    (path / "folds.csv").write_text("\n".join([",".join(["fold", "run", "seed", "seconds", *columns]), *rows]) + "\n")
    (path / "summary.csv").write_text("metric,mean\nval_accuracy,0.8333\n")
    return path


BASELINES = [
    {"name": "majority class", "role": "baseline", "val": {"n": 8, "accuracy": 0.99, "balanced_accuracy": 0.99,
                                                           "f1_macro": 1.0}, "seconds": 0.01,
     "note": "always 'a', the most frequent training class"},
    {"name": "simple_cnn", "role": "candidate", "val": {"n": 8, "accuracy": 0.1, "balanced_accuracy": 0.1,
                                                        "f1_macro": 0.05},
     "test": {"n": 8, "accuracy": 0.2, "balanced_accuracy": 0.2, "f1_macro": 0.1}, "seconds": None, "note": ""},
]


def add_baselines(run_dir, rows) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "metrics.json").write_text(json.dumps({**metrics, "baselines": rows}))
    return metrics


def test_the_report_and_the_console_put_the_run_next_to_its_baselines(run_copy):
    metrics = add_baselines(run_copy, BASELINES)
    own = metrics["val"]["f1_macro"]
    sentence = f"The model does not beat the majority class baseline on val macro-F1 ({own:.3f} vs 1.000)."
    page = write_report(run_copy).read_text()
    section = page[page.index('<section id="baselines">'):]
    section = section[:section.index("</section>")]
    assert "<h2>This model vs baselines</h2>" in section and sentence in section
    assert "simple_cnn candidate" not in section  # the model beats it: no sentence for it
    assert section.index(sentence) < section.index("<table>")  # the sentence sits above the table
    names = re.findall(r"<tr><td[^>]*>([^<]*)</td><td[^>]*>([^<]*)</td>", section)
    assert [role for _, role in names] == ["this run", "baseline", "candidate"]  # the run's row first
    head = re.findall(r"<th>([^<]*(?:<wbr>[^<]*)*)</th>", section)
    assert [h for h in head if h.startswith(("val", "test"))] == [
        f"{s} {m}" for s in ("val", "test") for m in ("accuracy", "balanced acc.", "macro F1")]
    assert "<td>0.990</td>" in section and "<td>0.100</td>" in section  # same splits, same format

    lines = baseline_lines({**metrics, "baselines": BASELINES})
    assert lines == baseline_lines(metrics, BASELINES)
    assert lines[0].startswith("This model vs baselines")
    assert lines[1].split() == ["model", "val", "acc.", "val", "bal.", "acc.", "val", "macro-F1", "test", "acc.",
                                "test", "bal.", "acc.", "test", "macro-F1", "seconds"]
    assert lines[2].split()[:2] == ["this", "run"]  # the run's line first
    assert lines[3].split()[:3] == ["majority", "class", "(baseline)"] and lines[3].split()[3:9] == [
        "0.990", "0.990", "1.000", "n/a", "n/a", "n/a"]
    assert lines[4].split()[:2] == ["simple_cnn", "(candidate)"] and lines[4].split()[-1] == "n/a"
    assert len({len(line) for line in lines[1:5]}) == 1  # aligned columns
    assert lines[5:] == [sentence]


def test_a_model_that_beats_its_baselines_is_told_so_and_a_run_without_them_renders_as_before(run_copy):
    metrics = json.loads((run_copy / "metrics.json").read_text())
    metrics.pop("baselines")  # as a run from before baselines existed
    (run_copy / "metrics.json").write_text(json.dumps(metrics))
    assert baseline_lines(metrics) == [] and 'id="baselines"' not in write_report(run_copy).read_text()
    add_baselines(run_copy, BASELINES[1:])
    page = write_report(run_copy).read_text()
    assert ('The model beats every baseline on val macro-F1 '
            f'({metrics["val"]["f1_macro"]:.3f} vs at best 0.050, the simple_cnn candidate).') in page
    assert "does not beat" not in page


def test_a_split_of_one_class_draws_a_note_not_an_empty_legend(drawn, tmp_path):
    """Every image of one class: no one-vs-rest curve exists; matplotlib warned "No artists with labels" on the
    user's terminal and the figure was an empty frame."""
    preds = predictions(["cat", "dog"], n=10)
    preds = Predictions(preds.paths, preds.classes, np.zeros(10, dtype=int), preds.probs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails
        evalplots.plot_roc(preds, tmp_path / "roc_val.png", "val")
        evalplots.plot_pr(preds, tmp_path / "pr_val.png", "val")
    for name in ("roc_val.png", "pr_val.png"):
        ax = drawn[name].axes[0]
        assert ax.get_legend() is None
        assert [t.get_text() for t in ax.texts] == ["no curve: every val image is of one class"]
