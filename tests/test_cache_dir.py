"""The decode cache's folder as a whole (data/cachedir.py, `imgclf cache`): it is kept within
IMGCLF_CACHE_MAX_GB by removing the least recently used entries, never one another process is building
and never a file imgclf did not make; `imgclf cache` lists, prunes and clears it."""

import fcntl
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clitools import release_in_use_mark
from imgclf.cli import main
from imgclf.config import build_config
from imgclf.data import cache, cachedir
from imgclf.data.cache import decode_all
from imgclf.data.cachedir import ORPHAN_AGE_S, keep_within_limit, limit_bytes, prune, scan
from imgclf.data.cachefiles import read_features, write_features
from imgclf.data.index import build_index
from imgclf.data.pipeline import prepare
from imgclf.errors import ConfigError, DataError
from imgclf.models.networks import Preprocess

from imagefactory import make_class_folders


def pngs(folder: Path, count: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    paths = [folder / f"{i}.png" for i in range(count)]
    for path in paths:
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(path)
    return paths


def entry(cache: Path, images: list[Path]) -> str:
    """Decode ``images`` into ``cache`` (or reuse them) and return the entry's key, as a process that has
    since ended would: this process drops its in-use mark."""
    key = decode_all(images, 32, 3, cache).file.stem
    release_in_use_mark(cache / f"{key}.npy")
    return key


def last_used(cache: Path, key: str, seconds_ago: float) -> None:
    when = time.time() - seconds_ago
    for path in cache.glob(f"{key}.*"):
        os.utime(path, (when, when))


def keys(cache: Path) -> set[str]:
    return {e.key for e in scan(cache).entries}


def test_the_least_recently_used_entries_go_first_and_a_reuse_counts_as_a_use(tmp_path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    sets = [pngs(tmp_path / name, 4, seed) for seed, name in enumerate("abc")]
    a, b = entry(cache, sets[0]), entry(cache, sets[1])
    last_used(cache, a, 300)
    last_used(cache, b, 200)
    assert entry(cache, sets[0]) == a  # a cache hit: a is now the newest
    c = entry(cache, sets[2])
    one = scan(cache).entries[0].size
    monkeypatch.setenv("IMGCLF_CACHE_MAX_GB", str(2.5 * one / 1e9))
    with caplog.at_level(logging.INFO, logger="imgclf"):
        keep_within_limit(cache, frozenset({c}))
    assert keys(cache) == {a, c}
    assert "removed 1 least recently used entry" in caplog.text and "IMGCLF_CACHE_MAX_GB" in caplog.text
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(b)) == [f"{b}.lock"]  # the lock stays
    assert entry(cache, sets[1]) == b and keys(cache) == {a, b, c}  # what was removed is decoded again


def test_a_run_keeps_its_own_entry_and_says_when_that_alone_is_over_the_limit(tmp_path, monkeypatch, caplog):
    data = make_class_folders(tmp_path / "d", 3)
    config = build_config({"data": {"path": str(data), "cache_dir": str(tmp_path / "cache")}, "out": str(tmp_path)})
    old = entry(tmp_path / "cache", pngs(tmp_path / "old", 3, 0))
    monkeypatch.setenv("IMGCLF_CACHE_MAX_GB", "0")
    with caplog.at_level(logging.INFO, logger="imgclf"):
        prepared = prepare(build_index(config.data, 0), Preprocess(12, 3, (0.5,) * 3, (0.25,) * 3), config.data)
    assert keys(tmp_path / "cache") == {prepared.decoded.file.stem} != {old}
    assert prepared.decoded.open().shape[0] == 9
    assert "over its 0 kB limit" in caplog.text


@pytest.mark.parametrize("value", ["-1", "lots", "nan", "1e3e"])
def test_a_bad_limit_is_refused_in_one_line_before_anything_is_decoded(tmp_path, monkeypatch, value):
    monkeypatch.setenv("IMGCLF_CACHE_MAX_GB", value)
    config = build_config({"data": {"path": str(make_class_folders(tmp_path / "d", 2)),
                                    "cache_dir": str(tmp_path / "cache")}, "out": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"IMGCLF_CACHE_MAX_GB=.* is not a size in GB"):
        prepare(build_index(config.data, 0), Preprocess(12, 3, (0.5,) * 3, (0.25,) * 3), config.data)
    assert not (tmp_path / "cache").exists()


def test_inf_never_removes_an_entry(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = entry(cache, pngs(tmp_path / "a", 2, 0))
    monkeypatch.setenv("IMGCLF_CACHE_MAX_GB", "inf")
    assert limit_bytes() == float("inf")
    keep_within_limit(cache, frozenset())
    assert keys(cache) == {first}


def test_an_entry_another_process_is_building_stays(tmp_path):
    cache = tmp_path / "cache"
    busy, free = entry(cache, pngs(tmp_path / "a", 2, 0)), entry(cache, pngs(tmp_path / "b", 2, 1))
    with open(cache / f"{busy}.lock", "a") as held:  # another open file description: as another process's
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        result = prune(cache, 0)
    assert [e.key for e in result.removed] == [free] and keys(cache) == {busy} and result.size > 0


def test_an_entry_a_process_uses_stays_until_it_ends(tmp_path):
    cache = tmp_path / "cache"
    images = pngs(tmp_path / "a", 2, 0)
    used = decode_all(images, 32, 3, cache)  # this process now uses it, as a training run does
    assert prune(cache, 0).removed == [] and used.open().shape == (2, 3, 32, 32)
    release_in_use_mark(used.file)  # the process ends
    assert len(prune(cache, 0).removed) == 1 and keys(cache) == set()


def test_only_files_imgclf_makes_are_removed_and_links_are_not_followed(tmp_path):
    cache = tmp_path / "cache"
    key = entry(cache, pngs(tmp_path / "a", 2, 0))
    write_features(cache / f"{'b' * 24}.probe.npy", np.zeros((2, 4)))
    (cache / f"{'b' * 24}.probe.json").write_text("{}")  # the probe's scores: one entry with its features
    outside = tmp_path / "precious.npy"
    outside.write_bytes(b"mine")
    (cache / f"{'d' * 24}.npy").symlink_to(outside)
    (cache / f"{'c' * 24}.npy").mkdir()  # a folder with an entry's name
    os.mkfifo(cache / f"{'e' * 24}.json")
    (cache / "notes.txt").write_text("mine")
    found = {(e.key, e.kind): sorted(p.name for p in e.files) for e in scan(cache).entries}
    assert found == {(key, "decoded images"): [f"{key}.json", f"{key}.npy"],
                     ("b" * 24, "probe features"): [f"{'b' * 24}.probe.json", f"{'b' * 24}.probe.npy"],
                     ("d" * 24, "decoded images"): [f"{'d' * 24}.npy"]}
    assert len(prune(cache, 0).removed) == 3
    assert outside.read_bytes() == b"mine" and (cache / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in cache.iterdir()) == sorted([f"{'c' * 24}.npy", f"{'d' * 24}.lock",
                                                              f"{'e' * 24}.json", f"{key}.lock", "notes.txt"])


def test_orphaned_temporary_files_are_removed_a_live_writers_are_not(tmp_path):
    cache = tmp_path / "cache"
    key = entry(cache, pngs(tmp_path / "a", 2, 0))
    killed_decode = cache / f".{key}.npy.x1.tmp"
    busy_decode = cache / f".{'f' * 24}.npy.x2.tmp"
    old_features, new_features = cache / f".{'b' * 24}.probe.npy.x3.tmp", cache / f".{'b' * 24}.probe.npy.x4.tmp"
    for path in (killed_decode, busy_decode, old_features, new_features):
        path.write_bytes(b"partial")
    os.utime(old_features, (time.time() - ORPHAN_AGE_S - 60,) * 2)
    with open(cache / f"{'f' * 24}.lock", "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        result = prune(cache, float("inf"))
    assert result.orphans == 2 and result.removed == []
    assert {p.name for p in scan(cache).temporary} == {busy_decode.name, new_features.name}


def test_a_feature_reuse_counts_as_a_use(tmp_path):
    npy = tmp_path / f"{'b' * 24}.probe.npy"
    write_features(npy, np.ones((3, 2)))
    os.utime(npy, (1_000_000_000,) * 2)
    assert read_features(npy, (3, 2), (0, 2)) is not None
    assert npy.stat().st_mtime > time.time() - 60


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_cache_command_lists_prunes_and_clears(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    a, b = entry(cache, pngs(tmp_path / "a", 3, 0)), entry(cache, pngs(tmp_path / "b", 3, 1))
    last_used(cache, a, 600)
    code, out, _ = cli(capsys, "cache", "--dir", cache)
    assert code == 0 and "2 entries" in out and "limit 20.00 GB" in out
    assert out.index(b) < out.index(a)  # newest first
    one = scan(cache).entries[0].size
    code, out, _ = cli(capsys, "cache", "--dir", cache, "--prune", "--max-gb", 1.5 * one / 1e9)
    assert code == 0 and "removed 1 entry" in out and keys(cache) == {b}
    assert "to reach --max-gb" in out and "(this once: the cache's own limit is below)" in out  # then 20 GB
    monkeypatch.setenv("IMGCLF_CACHE_DIR", str(cache))
    code, out, _ = cli(capsys, "cache", "--clear")
    assert code == 0 and "removed 1 entry" in out and keys(cache) == set() and "0 entries" in out
    monkeypatch.setenv("IMGCLF_CACHE_MAX_GB", "abc")  # a bad limit blocks only what needs it: a prune to it
    code, out, _ = cli(capsys, "cache", "--clear")
    assert code == 0 and "limit unreadable: IMGCLF_CACHE_MAX_GB='abc' is not a size in GB" in out
    code, _, err = cli(capsys, "cache", "--prune")
    assert code == 2 and "IMGCLF_CACHE_MAX_GB='abc' is not a size in GB" in err


@pytest.mark.parametrize("args,message", [
    (["--max-gb", "2"], "--max-gb goes with --prune"),
    (["--prune", "--max-gb", "-1"], "--max-gb -1.0: use a size in GB of 0 or more"),
    (["--prune", "--max-gb", "nan"], "--max-gb nan: use a size in GB"),
    (["--dir", "FILE"], "is not a folder; pass --dir"),
    (["--dir", "a" * 300], "(File name too long); pass --dir"),
    (["--dir", "NOWHERE", "--clear"], "NOWHERE: no such folder; pass the cache's folder"),
])
def test_the_cache_command_refuses_bad_settings_in_one_line(tmp_path, capsys, args, message):
    (tmp_path / "FILE").write_text("x")
    args = [str(tmp_path / "FILE") if a == "FILE" else a for a in args]
    code, _, err = cli(capsys, "cache", *(args if "--dir" in args else ["--dir", tmp_path / "c", *args]))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_cache_folder_that_cannot_be_listed_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = cli(capsys, "cache", "--dir", tmp_path / "file" / "cache")  # under a file: not a directory
    assert code == 2 and "cannot read the decode cache folder" in err and len(err.strip().splitlines()) == 1


def test_only_local_rank_0_touches_or_prunes_the_machines_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    images = pngs(tmp_path / "a", 2, 0)
    key = entry(cache, images)
    last_used(cache, key, 600)
    before = scan(cache).entries[0].last_used
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("IMGCLF_CACHE_MAX_GB", "0")
    assert entry(cache, images) == key and scan(cache).entries[0].last_used == before  # read, not touched
    keep_within_limit(cache, frozenset())
    assert keys(cache) == {key}
    monkeypatch.setenv("LOCAL_RANK", "0")
    keep_within_limit(cache, frozenset())
    assert keys(cache) == set()


def test_an_entry_held_exclusively_elsewhere_is_used_with_a_warning_not_waited_on_forever(tmp_path, monkeypatch,
                                                                                         caplog):
    cache = tmp_path / "cache"
    images = pngs(tmp_path / "a", 2, 0)
    key = entry(cache, images)
    monkeypatch.setattr(cachedir, "HOLD_WAIT_S", 0.2)
    with open(cache / f"{key}.npy", "rb") as held, caplog.at_level(logging.WARNING, logger="imgclf"):
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # a stuck or hostile process
        used = decode_all(images, 32, 3, cache)
    assert used.open().shape == (2, 3, 32, 32) and used.file not in cachedir._held
    assert "stayed locked by another process" in caplog.text


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_a_cache_folder_that_cannot_be_made_is_a_one_line_error(tmp_path, monkeypatch, where):
    (tmp_path / "file").write_text("x")
    folder = tmp_path / "file" if where == "a file" else tmp_path / "file" / "cache"
    monkeypatch.setenv("IMGCLF_CACHE_DIR", str(folder))
    with pytest.raises(DataError, match=f"cannot use {folder} as the decode cache folder .*; set IMGCLF_CACHE_DIR"):
        decode_all(pngs(tmp_path / "a", 2, 0), 32, 3)
    assert (tmp_path / "file").read_text() == "x"


def test_an_empty_cache_setting_means_the_default_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLF_CACHE_DIR", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    decoded = decode_all(pngs(tmp_path / "a", 2, 0), 32, 3)
    assert decoded.file.parent == tmp_path / "home" / ".cache" / "imgclf"
    release_in_use_mark(decoded.file)


def other_process(code: str) -> None:
    """``code`` in another interpreter, as a concurrent run or `imgclf cache --prune` would run it."""
    subprocess.run([sys.executable, "-c", f"from pathlib import Path\nfrom imgclf.data import cache, cachedir\n{code}"],
                   check=True, timeout=60)


def prune_elsewhere(folder: Path) -> str:
    return f"cachedir.prune(Path({str(folder)!r}), 0)"


@pytest.mark.parametrize("moment", ["right after it is built", "built elsewhere between the mark and the check"])
def test_a_prune_in_another_process_cannot_remove_an_entry_a_run_is_about_to_use(tmp_path, monkeypatch, moment):
    """The in-use mark is taken under the key's lock (which a pruner needs too) whenever the first mark did
    not land on the file that was checked; found by review, both moments lost the entry before."""
    folder, images = tmp_path / "cache", pngs(tmp_path / "a", 3, 0)
    real, calls = cache.hold_in_use, []

    def hold(npy: Path) -> None:
        calls.append(npy)
        if moment == "right after it is built" and len(calls) == 2:
            other_process(prune_elsewhere(folder))
        real(npy)
        if moment != "right after it is built" and len(calls) == 1:
            other_process(f"cache.decode_all([Path(p) for p in {[str(p) for p in images]!r}], 32, 3, "
                          f"{str(folder)!r})")

    monkeypatch.setattr(cache, "hold_in_use", hold)
    used = decode_all(images, 32, 3, folder)
    other_process(prune_elsewhere(folder))
    assert used.file.exists() and cachedir.holds_current(used.file) and used.open().shape == (3, 3, 32, 32)
    release_in_use_mark(used.file)
