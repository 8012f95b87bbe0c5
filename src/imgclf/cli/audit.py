"""``imgclf audit``: a dataset's counts, image statistics, unreadable files, duplicates and leakage. It
needs no torch, so the parser's dispatch (``usage.lazy``) answers it without loading any."""

from __future__ import annotations

import argparse

from imgclf import atomic
from imgclf.data.audit import audit_dataset, format_report


def cmd_audit(args: argparse.Namespace) -> int:
    report = audit_dataset(args.data_dir, args.layout, near=not args.no_near)
    print(format_report(report))
    if args.json:
        atomic.write_json(args.json, report)
        print(f"wrote {args.json}")
    problems = len(report["unreadable"]) + len(report["exact_duplicates_across_splits"]) \
        + (report["near_duplicate_pairs_across_splits"] or 0) + len(report.get("test_overlap_across_folds", []))
    return 1 if args.strict and problems else 0
