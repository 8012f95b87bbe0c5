"""Time `imgclf demo` as a newcomer runs it: the README's timing claim, measured (tests assert only accuracy).

It runs the console script in a fresh folder, then prints the wall time, the demo's own training
time and test accuracy, the machine's load, and the wall time against the 180 s the README allows.

    python benchmarks/demo.py [--transfer]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 180.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transfer", action="store_true", help="time `imgclf demo --transfer` instead")
    args = parser.parse_args()
    command = [shutil.which("imgclf") or str(Path(sys.executable).with_name("imgclf")), "demo"]
    command += ["--transfer"] if args.transfer else []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run(command, cwd=tmp, check=True, capture_output=True)
        wall = time.perf_counter() - start
        run = next((Path(tmp) / "imgclf-demo" / "runs").iterdir())
        test = json.loads((run / "metrics.json").read_text())["test"]
        history = (run / "history.csv").read_text().splitlines()
    print(f"{' '.join(command[1:])}: {wall:.1f} s wall ({wall / TARGET_S:.2f} of the {TARGET_S:.0f} s target), "
          f"{len(history) - 1} epochs, test accuracy {test['accuracy']:.4f}, load {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPU cores")


if __name__ == "__main__":
    main()
