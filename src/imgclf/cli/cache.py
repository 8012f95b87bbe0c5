"""``imgclf cache``: what the decode cache holds, and removing entries from it (``--prune``, ``--clear``).
It needs no torch, so the parser's dispatch (``usage.lazy``) answers it without loading any."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from imgclf.data.cachedir import MAX_GB_ENV, default_cache_dir, limit_bytes, prune, scan, size_text
from imgclf.errors import ConfigError


def cmd_cache(args: argparse.Namespace) -> int:
    folder = Path(args.dir) if args.dir else default_cache_dir()
    try:
        not_a_folder = folder.exists() and not folder.is_dir()
    except OSError as err:  # e.g. a name too long
        raise ConfigError(f"cannot use {str(folder)[:200]} as the cache folder ({err.strerror}); pass --dir with the "
                          "cache's folder") from None
    if not_a_folder:
        raise ConfigError(f"the cache folder {folder} is not a folder; pass --dir with the cache's folder")
    if args.max_gb is not None and not args.prune:
        raise ConfigError("--max-gb goes with --prune (imgclf cache --prune --max-gb GB)")
    if args.max_gb is not None and not args.max_gb >= 0:
        raise ConfigError(f"--max-gb {args.max_gb}: use a size in GB of 0 or more")
    if args.dir and (args.prune or args.clear):
        _require_folder(folder)
    limit: float | str  # the limit, or why IMGCLF_CACHE_MAX_GB gives none (needed only to prune to it)
    try:
        limit = limit_bytes()
    except ConfigError as err:
        if args.prune and args.max_gb is None:
            raise
        limit = str(err)
    if args.prune or args.clear:
        target = 0.0 if args.clear else args.max_gb * 1e9 if args.max_gb is not None else float(limit)
        result = prune(folder, target)
        freed = sum(e.size for e in result.removed)
        once = f" to reach --max-gb {args.max_gb:g} (this once: the cache's own limit is below)" if (
            args.max_gb is not None and not args.clear) else ""
        print(f"removed {len(result.removed)} entr{'y' if len(result.removed) == 1 else 'ies'} "
              f"({size_text(freed)}) and {result.orphans} temporary file(s) left by killed writers{once}")
        if result.size > target:
            print(f"{size_text(result.size)} stay: entries a process is using or building, or that cannot be removed")
    _print_contents(folder, limit)
    return 0


def _require_folder(folder: Path) -> None:
    """Pruning a misspelt --dir would look like success; other stat errors are left to the listing to name."""
    try:
        os.stat(folder)
    except FileNotFoundError:
        raise ConfigError(f"--dir {folder}: no such folder; pass the cache's folder (by default "
                          f"{default_cache_dir()})") from None
    except OSError:
        pass


def _print_contents(folder: Path, limit: float | str) -> None:
    contents = scan(folder)
    count = len(contents.entries)
    source = f"set by {MAX_GB_ENV}" if os.environ.get(MAX_GB_ENV, "").strip() else f"{MAX_GB_ENV} changes it"
    shown = f"limit {size_text(limit)}, {source}" if isinstance(limit, float) else f"limit unreadable: {limit}"
    absent = "" if folder.exists() else ": the folder does not exist (yet)"
    print(f"decode cache {folder}{absent}: {count} entr{'y' if count == 1 else 'ies'}, {size_text(contents.size)} "
          f"({shown})")
    if count:
        print(f"  {'last used':<16}  {'size':>10}  {'kind':<14}  key")
    for entry in reversed(contents.entries):
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used))
        print(f"  {when:<16}  {size_text(entry.size):>10}  {entry.kind:<14}  {entry.key}")
    if contents.temporary:
        print(f"  and {len(contents.temporary)} temporary file(s) of writers, live or killed (--prune removes "
              "the orphans)")
