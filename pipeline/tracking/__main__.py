"""python -m pipeline.tracking sync runs/NAME [--tracking-uri URI]: replay a run's
metrics.jsonl (or every run of a folder) into MLflow, idempotent and resumable (a run
trained with tracking.mode=offline, or one whose server was away at its end)."""
from __future__ import annotations

import sys
from pathlib import Path

from pipeline.cli import command_line
from pipeline.tracking.store import announce_store, resolve_tracking_uri
from pipeline.tracking.sync import RunSync, recorded_tracking_uri


def run_folders(path: Path) -> list[Path]:
    """`path` itself if it is a run folder, else the run folders directly inside it."""
    if (path / "metrics.jsonl").is_file():
        return [path]
    return sorted(d for d in path.iterdir() if (d / "metrics.jsonl").is_file()) if path.is_dir() else []


def main(argv=None) -> int:
    parser = command_line("python -m pipeline.tracking", __doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    sync = commands.add_parser("sync", help="replay runs' metrics.jsonl into MLflow (idempotent, resumable)")
    sync.add_argument("path", type=Path, help="a run folder (runs/NAME) or a folder of runs (runs/)")
    sync.add_argument("--tracking-uri", help="default: the URI each run was configured with")
    args = parser.parse_args(argv)
    folders = run_folders(args.path)
    if not folders:
        print(f"error: {args.path}: no metrics.jsonl in it or in the folders directly inside it", file=sys.stderr)
        return 2
    failed = 0
    for folder in folders:
        uri = args.tracking_uri or recorded_tracking_uri(folder) or resolve_tracking_uri("", folder.parent)
        announce_store(uri)
        replay = RunSync(folder, uri)
        try:
            sent = replay.push()
        except Exception as e:  # noqa: BLE001 (one line per run; the others still go)
            failed += 1
            print(f"error: {folder}: MLflow at {uri} did not take it ({type(e).__name__}: {str(e)[:300]}); "
                  f"run the same command again to continue", file=sys.stderr)
            continue
        refused = f", {replay.refused} refused (see above)" if replay.refused else ""
        print(f"{folder}: {sent} records sent to {uri}, run {replay.run_id or '-'}{refused}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
