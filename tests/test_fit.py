import csv
import json
import logging
import weakref

import pytest
import torch

import imgclf
from imgclf import atomic
from imgclf.config import TrainConfig
from imgclf.training.fit import EarlyStopping, EpochClock, EpochLabels, OutOfTime, out_of_time_after
from imgclf.training.optim import build_optimizer

from conftest import tiny_config


def test_early_stopping_counts_epochs_without_improvement():
    stopper = EarlyStopping("val_loss", patience=2, min_delta=0.01)
    assert stopper.update(1.0, 1) and not stopper.should_stop
    assert not stopper.update(0.995, 2)  # within min_delta: not an improvement
    assert not stopper.should_stop
    assert not stopper.update(1.2, 3) and stopper.should_stop
    assert (stopper.best, stopper.best_epoch) == (1.0, 1)


def test_early_stopping_maximises_non_loss_metrics():
    stopper = EarlyStopping("val_accuracy", patience=1)
    stopper.update(0.5, 1)
    assert stopper.update(0.6, 2) and not stopper.update(0.55, 3) and stopper.should_stop


def test_patience_zero_stops_at_the_first_epoch_without_improvement_as_keras_does():
    stopper = EarlyStopping("val_loss", patience=0)
    assert stopper.update(1.0, 1) and not stopper.should_stop  # a first epoch is always an improvement
    assert stopper.update(0.9, 2) and not stopper.should_stop
    assert not stopper.update(0.95, 3) and stopper.should_stop


def test_out_of_time_when_another_epoch_as_long_would_end_after_the_deadline(monkeypatch):
    monkeypatch.setattr("imgclf.training.fit.time.perf_counter", lambda: 100.0)
    assert not out_of_time_after(90.0, None)  # no limit
    assert not out_of_time_after(90.0, 111.0)  # 10 s epoch, 11 s left
    assert out_of_time_after(90.0, 109.0)  # 10 s epoch, 9 s left


def test_max_seconds_ends_the_stage_after_an_epoch_and_skips_later_stages(pool_dataset, tmp_path, caplog,
                                                                          monkeypatch):
    calls = []

    def out_after_second_epoch(start, deadline):
        calls.append(deadline)
        return len(calls) >= 2

    monkeypatch.setattr("imgclf.training.fit.out_of_time_after", out_after_second_epoch)
    monkeypatch.setattr(EpochClock, "check", lambda self, done, total: None)  # the clock below is fake
    monkeypatch.setattr("imgclf.training.stages.time.perf_counter", lambda: 1e9 if calls else 0.0)
    caplog.set_level(logging.INFO)
    config = tiny_config(pool_dataset, tmp_path / "r", train={"epochs": 6, "max_seconds": 25,
                                                              "early_stopping": False},
                         stages=[{"name": "warm", "epochs": 5}, {"name": "tune", "epochs": 3}])
    imgclf.train(config)
    assert all(d is not None for d in calls)  # the run's deadline reached fit
    rows = (tmp_path / "r" / "history.csv").read_text().splitlines()[1:]
    assert [r.split(",")[1] for r in rows] == ["warm", "warm"]
    assert "time limit: warm ends after 2 epochs of 5 (--max-seconds 25;" in caplog.text
    assert "time limit: stage tune skipped (--max-seconds 25 spent)" in caplog.text


def test_epoch_clock_projects_the_end_from_the_batches_after_the_first(monkeypatch):
    now = iter([10.0, 11.0, 12.0, 13.0])  # first batch ends at 10 s, then 1 s a batch
    monkeypatch.setattr("imgclf.training.fit.time.perf_counter", lambda: next(now))
    clock = EpochClock(deadline=20.0, extra=0.5)
    clock.check(1, 10)  # the warm-up batch: nothing to project from
    clock.check(2, 10)  # 11 + 8 batches * 1 s + 0.5 = 19.5: in time
    with pytest.raises(OutOfTime) as late:
        EpochClock(deadline=20.0, extra=1.5, first_batch_end=10.0).check(3, 10)  # 12 + 7 + 1.5 = 20.5
    assert (late.value.done, late.value.total, late.value.overrun) == (3, 10, pytest.approx(0.5))
    EpochClock(deadline=0.0, first_batch_end=10.0).check(10, 10)  # the last batch: nothing left to give up


def test_an_epoch_that_would_overrun_the_time_limit_is_given_up_and_the_best_weights_kept(
        pool_dataset, tmp_path, caplog, monkeypatch):
    def always_late(self, done, total):
        raise OutOfTime(done, total, 7.0)

    monkeypatch.setattr(EpochClock, "check", always_late)
    caplog.set_level(logging.INFO)
    config = tiny_config(pool_dataset, tmp_path / "r", train={"epochs": 5, "max_seconds": 1000,
                                                              "early_stopping": False},
                         stages=[{"name": "warm", "epochs": 3}, {"name": "tune", "epochs": 2}])
    run = imgclf.train(config)
    rows = (tmp_path / "r" / "history.csv").read_text().splitlines()
    header, first = rows[0].split(","), rows[1].split(",")
    assert [r.split(",")[1] for r in rows[1:]] == ["warm"]  # epoch 1 has no best to go back to: never given up
    # the run ends with epoch 1's weights: its validation loss, not the part-trained epoch 2's
    assert run.metrics["val"]["log_loss"] == pytest.approx(float(first[header.index("val_loss")]), rel=1e-5)
    assert "time limit: warm 2/3 given up after" in caplog.text
    assert "going back to the best epoch (1)" in caplog.text
    assert "time limit: stage tune skipped (--max-seconds 1000 would be overrun: an epoch was given up)" \
        in caplog.text


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path):
    target = tmp_path / "metrics.json"
    atomic.write_json(target, {"accuracy": 0.9})
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"accuracy": 0.9}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary left behind


def test_atomic_writes_get_ordinary_permissions_and_keep_existing_ones(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "new.txt", "x")
        assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o644  # not mkstemp's 0600
        (tmp_path / "shared.txt").write_text("old")
        (tmp_path / "shared.txt").chmod(0o664)
        atomic.write_text(tmp_path / "shared.txt", "new")
        assert stat.S_IMODE((tmp_path / "shared.txt").stat().st_mode) == 0o664
    finally:
        os.umask(old)


def test_without_restore_best_the_last_epoch_is_kept_and_the_best_saved_aside(tmp_path, pool_dataset):
    run = imgclf.train(tiny_config(pool_dataset, tmp_path / "r", train={"epochs": 3, "restore_best": False}))
    assert run.meta.epoch == 3
    assert (run.path / "best.safetensors").is_file() and (run.path / "best.json").is_file()


def test_balanced_class_weights_are_printed(tmp_path, pool_dataset, caplog):
    with caplog.at_level(logging.INFO, logger="imgclf"):
        imgclf.train(tiny_config(pool_dataset, tmp_path / "r", train={"epochs": 1, "class_weight": "balanced"}))
    assert "class weights (balanced): left bar=1.000, right bar=1.000, top bar=1.000" in caplog.text


def test_results_do_not_depend_on_the_number_of_loader_processes(tmp_path, pool_dataset):
    """Workers only read the cache; order and augmentation are drawn in the training process."""
    single = imgclf.train(tiny_config(pool_dataset, tmp_path / "a", train={"epochs": 2},
                                      augment={"preset": "medium"}, data={"workers": 0}))
    workers = imgclf.train(tiny_config(pool_dataset, tmp_path / "b", train={"epochs": 2},
                                       augment={"preset": "medium"}, data={"workers": 2}))
    assert workers.metrics["test"]["n"] == single.metrics["test"]["n"]
    assert workers.metrics == single.metrics


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_steps_fused_and_updates_as_the_per_tensor_adam_does(name):
    torch.manual_seed(0)
    start, grads = torch.randn(5, 7), [torch.randn(5, 7) for _ in range(3)]
    ours, theirs = start.clone().requires_grad_(), start.clone().requires_grad_()
    fused = build_optimizer([ours], TrainConfig(optimizer=name, lr=0.01, weight_decay=0.1))
    reference = (torch.optim.Adam if name == "adam" else torch.optim.AdamW)([theirs], lr=0.01, weight_decay=0.1,
                                                                             foreach=False)
    assert fused.defaults["fused"] is True
    for grad in grads:
        for param, optimizer in ((ours, fused), (theirs, reference)):
            param.grad = grad.clone()
            optimizer.step()
    assert torch.allclose(ours, theirs, atol=1e-6) and not torch.equal(ours, start)


def test_an_epochs_labels_keep_every_batch_in_order_and_no_step_tensor_alive():
    labels = EpochLabels(steps=2)  # room for 2 batches of the first one's size; a larger one makes it grow
    batches = [(torch.tensor([0, 1]), torch.tensor([1, 1])), (torch.tensor([2, 0, 1]), torch.tensor([2, 0, 0])),
               (torch.tensor([1, 2, 2, 0]), torch.tensor([1, 2, 0, 0]))]
    alive = []
    for truth, decided in batches:
        labels.add(truth, decided)
        alive += [weakref.ref(truth), weakref.ref(decided)]
    del batches, truth, decided
    truth, decided = labels.arrays()
    assert truth.tolist() == [0, 1, 2, 0, 1, 1, 2, 2, 0] and decided.tolist() == [1, 1, 2, 0, 0, 1, 2, 0, 0]
    assert not any(ref() is not None for ref in alive)  # the epoch keeps copies, not the steps' tensors


def test_each_stage_counts_improvements_with_its_own_min_delta(tmp_path, pool_dataset):
    """A stage's min_delta is its own: stage b (0) keeps an epoch that beats stage a's best by any amount,
    although stage a (10) counted nothing after its first epoch as an improvement."""
    stages = [{"name": "a", "epochs": 2, "min_delta": 10.0}, {"name": "b", "epochs": 3, "min_delta": 0.0}]
    run = imgclf.train(tiny_config(pool_dataset, tmp_path / "r", stages=stages,
                                   train={"early_stopping": False, "lr": 0.01}))
    history = list(csv.DictReader(open(run.path / "history.csv")))
    best, best_epoch = float(history[0]["val_loss"]), 1
    for row in history[2:]:  # stage b, where any gain counts
        if float(row["val_loss"]) < best:
            best, best_epoch = float(row["val_loss"]), int(row["epoch"])
    assert best_epoch > 2  # stage b improved on stage a's best, so the test can tell the two rules apart
    assert json.loads((run.path / "model.json").read_text())["epoch"] == best_epoch
