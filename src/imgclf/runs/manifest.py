"""The seal of a finished run: ``manifest.json`` holds the sha256 of every file that defines the model.

Written when a run finishes; checked every time the run is opened. One flipped byte in the
weights, or a ``classes.json`` with its order swapped, is then an error naming the file instead of
a model that silently answers with the wrong labels. Outputs that ``evaluate`` and ``report``
rewrite (predictions, metrics, plots, report.html) are not sealed; files that change what the
model answers are. A user who edits a sealed file on purpose re-seals with ``imgclf seal RUN``,
which validates the whole run before it writes the new manifest.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from imgclf import atomic
from imgclf.errors import RunDirError
from imgclf.logs import get_logger
from imgclf.runs.files import read_json
from imgclf.safeio import require_regular

MANIFEST_FILE = "manifest.json"
INCOMPLETE = "INCOMPLETE"  # in a run directory from its creation until the run is finished and sealed
# What a later predict, evaluate, export or serve reads to decide an answer.
SEALED = ("run.json", "config.yaml", "classes.json", "dataset.json", "split.csv", "model.safetensors", "model.json",
          "head.skops", "threshold.json", "ensemble.json")
FORMAT = 1
log = get_logger("manifest")
_warned: set[Path] = set()


def file_sha256(path: Path) -> str:
    """The sha256 of a regular file, streamed; a FIFO, device or folder there is a RunDirError, never waited on."""
    require_regular(path, RunDirError, "put the run's own file back, or re-train")
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def seal(run_dir: str | Path) -> dict[str, str]:
    """Write ``manifest.json`` for the sealed files present now; returns {file: sha256}."""
    run_dir = Path(run_dir)
    # every sealed name present, a FIFO or folder in its place included: file_sha256 refuses those, not skips them
    files = {name: file_sha256(run_dir / name) for name in SEALED if (run_dir / name).exists()}
    atomic.write_json(run_dir / MANIFEST_FILE, {"format": FORMAT, "sha256": files})
    return files


def reseal(run_dir: Path, *names: str) -> None:
    """After imgclf itself rewrote (or removed) ``names`` in a sealed run, record their new state."""
    manifest = run_dir / MANIFEST_FILE
    if not manifest.is_file():
        return
    files = _recorded(run_dir)
    for name in names:
        path = run_dir / name
        if path.is_file():
            files[name] = file_sha256(path)
        else:
            files.pop(name, None)
    atomic.write_json(manifest, {"format": FORMAT, "sha256": files})


def refuse_unfinished(run_dir: Path) -> None:
    if (run_dir / INCOMPLETE).is_file():
        raise RunDirError(f"{run_dir} has not finished (it is running, failed or was killed); continue it with "
                          f"imgclf train --resume {run_dir}, or train again with the same --out")


def verify(run_dir: Path) -> None:
    """Every sealed file matches its recorded hash, and none was added or removed since sealing.

    A run without a manifest (written before manifests existed) still opens, with one warning; an
    unfinished run (its ``INCOMPLETE`` marker still there) does not.
    """
    refuse_unfinished(run_dir)
    if not os.path.lexists(run_dir / MANIFEST_FILE):  # anything else there (a FIFO, a folder) is read, and refused
        if run_dir not in _warned:
            _warned.add(run_dir)
            log.warning("warning: %s has no %s (an older or unfinished run), so its files cannot be checked; "
                        "after checking it, seal it with: imgclf seal %s", run_dir, MANIFEST_FILE, run_dir)
        return
    recorded = _recorded(run_dir)
    for name in SEALED:
        path = run_dir / name
        if name not in recorded:
            if os.path.lexists(path):
                raise RunDirError(f"{path} was added after the run was sealed; remove it, or if it belongs "
                                  f"there: imgclf seal {run_dir}")
            continue
        if not path.is_file():
            raise RunDirError(f"{path} is missing but the run's manifest lists it; restore it")
        if file_sha256(path) != recorded[name]:
            raise RunDirError(f"{path} changed since the run was sealed (sha256 differs); restore it, "
                              f"or if you edited it on purpose: imgclf seal {run_dir}")


def probability_seal(run_dir: Path) -> dict[str, str]:
    """The recorded hashes of the files that decide a run's probabilities (all sealed ones but its threshold,
    which an ensemble does not use): what an ensemble keeps of each member, to notice one changed or replaced.
    Empty for a run sealed before manifests existed."""
    if not (run_dir / MANIFEST_FILE).is_file():
        return {}
    return {name: digest for name, digest in _recorded(run_dir).items() if name != "threshold.json"}


def _recorded(run_dir: Path) -> dict[str, str]:
    path = run_dir / MANIFEST_FILE
    data = read_json(path)
    files = data.get("sha256") if isinstance(data, dict) else None
    well_formed = isinstance(files, dict) and all(
        k in SEALED and isinstance(v, str) and len(v) == 64 for k, v in files.items())
    if not well_formed or data.get("format") != FORMAT:
        raise RunDirError(f"{path} is not an imgclf manifest of format {FORMAT} (sha256: sealed file -> hash); "
                          f"restore it, or after checking the run: imgclf seal {run_dir}")
    return dict(files)
