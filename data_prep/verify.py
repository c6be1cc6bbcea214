"""Read every shard of a shard directory and check it against its manifest.

    python -m data_prep.verify shards/yfcc [--write-manifest]

For each tar listed in manifest.yaml (and any tar in the directory it does not list):
does it open, does it read to the end, how many samples does it hold, and does every
sample have an image that decodes and a non-empty caption. Prints one line per problem
naming the shard (and sample key), then a summary; exits 1 if anything is wrong.
--write-manifest (re)writes manifest.yaml from what the tars actually hold (for shards
built by other tools).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from pipeline.data.decode import BadSample, decode_sample
from pipeline.data.manifest import MANIFEST_NAME, Manifest, ShardInfo


@dataclass
class ShardReport:
    name: str
    samples: int = 0  # samples with a decodable image and a caption
    bad: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)  # tar-level problems


def check_shard(path: Path) -> ShardReport:
    report = ShardReport(path.name)

    def on_error(exn: Exception) -> bool:
        what = "truncated" if report.samples or report.bad else "unreadable"
        report.errors.append(f"{what} tar ({exn.args[0] if exn.args else type(exn).__name__})")
        return True

    for sample in wds.tarfile_to_samples(handler=on_error)(iter([dict(url=str(path))])):
        try:
            decode_sample(sample)
            report.samples += 1
        except BadSample as bad:
            report.bad[bad.reason] += 1
            print(f"{path.name}: sample {sample.get('__key__')}: {bad.reason}")
    return report


def verify(directory: str, write_manifest: bool = False) -> int:
    root = Path(directory)
    if not root.is_dir():
        print(f"error: {directory}: not a directory", file=sys.stderr)
        return 1
    manifest = None
    problems = 0
    try:
        manifest = Manifest.read(root)
    except (FileNotFoundError, ValueError) as e:
        if not write_manifest:
            print(f"error: {e}")
            problems += 1
    listed = {s.name: s.samples for s in manifest.shards} if manifest else {}
    names = sorted(set(listed) | {p.name for p in root.glob("*.tar")})
    reports = []
    for name in tqdm(names, desc="verify shards", unit=" shards"):
        path = root / name
        if not path.is_file():
            print(f"{name}: listed in {MANIFEST_NAME} but missing")
            problems += 1
            continue
        report = check_shard(path)
        reports.append(report)
        for error in report.errors:
            print(f"{name}: {error}")
        problems += len(report.errors) + sum(report.bad.values())
        if manifest and not write_manifest:
            if name not in listed:
                print(f"{name}: not listed in {MANIFEST_NAME}")
                problems += 1
            elif listed[name] != report.samples:
                print(f"{name}: {MANIFEST_NAME} says {listed[name]} samples, the tar holds {report.samples} good ones")
                problems += 1
    bad = sum((r.bad for r in reports), Counter())
    print(f"{len(reports)} shards, {sum(r.samples for r in reports)} good samples, "
          f"{sum(bad.values())} bad samples ({', '.join(f'{k}={v}' for k, v in bad.items()) or 'none'}), "
          f"{sum(len(r.errors) for r in reports)} tar errors")
    if write_manifest:
        Manifest(shards=[ShardInfo(r.name, r.samples) for r in reports if not r.errors or r.samples],
                 failures=manifest.failures if manifest else {}, source=manifest.source if manifest else "").write(str(root))
        print(f"wrote {root / MANIFEST_NAME}")
    return 1 if problems else 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m data_prep.verify", description=__doc__.splitlines()[0],
                                     epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory")
    parser.add_argument("--write-manifest", action="store_true")
    args = parser.parse_args(argv)
    sys.exit(verify(args.directory, args.write_manifest))


if __name__ == "__main__":
    main()
