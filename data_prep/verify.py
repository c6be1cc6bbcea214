"""Read every shard of a shard directory and check it against its manifest.

    python -m data_prep.verify shards/yfcc [--write-manifest]
    python -m data_prep.verify s3://bucket/shards/yfcc [--read-timeout 60]

For each tar listed in manifest.yaml (and any tar in the directory it does not list):
does it open, does it read to the end, how many samples does it hold, and does every
sample have an image that decodes and a non-empty caption. Prints one line per problem
naming the shard (and sample key), then a summary; exits 1 if anything is wrong.
--write-manifest (re)writes manifest.yaml from what the tars actually hold (for shards
built by other tools). A remote directory (s3://, gs://, http(s)://) is checked against
its manifest's list, read with the training reader's timeouts and retries: a shard whose
store stops answering is reported unreadable, never waited on.
"""
from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from pipeline.cli import command_line
from pipeline.config import DataConfig
from pipeline.data.decode import BadSample, decode_sample, tar_members
from pipeline.data.manifest import MANIFEST_NAME, Manifest, ShardInfo
from pipeline.data.remote import ReadPolicy, is_remote, opened, read_policy


@dataclass
class ShardReport:
    name: str
    samples: int = 0  # samples with a decodable image and a caption
    bad: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)  # tar-level problems


def check_shard(url: str, policy: ReadPolicy = read_policy(DataConfig())) -> ShardReport:
    report = ShardReport(url.rsplit("/", 1)[-1])

    def on_error(exn: Exception) -> bool:
        what = "truncated" if report.samples or report.bad else "unreadable"
        report.errors.append(f"{what} tar ({exn.args[0] if exn.args else type(exn).__name__})")
        return True

    def refuse(shard, member, reason):
        report.errors.append(f"member {member}: {reason}")

    members = tar_members(opened(iter([dict(url=url)]), policy, on_error), DataConfig().max_member_bytes, refuse,
                          on_error)
    for sample in wds.tariterators.group_by_keys(members, handler=on_error):
        try:
            decode_sample(sample)
            report.samples += 1
        except BadSample as bad:
            report.bad[bad.reason] += 1
            print(f"{report.name}: sample {sample.get('__key__')}: {bad.reason}")
    return report


def verify(directory: str, write_manifest: bool = False, policy: ReadPolicy = read_policy(DataConfig())) -> int:
    remote = is_remote(directory)
    if remote and write_manifest:
        print(f"error: {directory}: --write-manifest needs a local directory", file=sys.stderr)
        return 1
    root = Path(directory)
    if not remote and not root.is_dir():
        print(f"error: {directory}: not a directory", file=sys.stderr)
        return 1
    manifest = None
    problems = 0
    try:
        manifest = Manifest.read(directory if remote else root, policy)
    except (FileNotFoundError, ValueError, OSError) as e:
        if remote or not write_manifest:
            print(f"error: {e}")
            problems += 1
    listed = {s.name: s.samples for s in manifest.shards} if manifest else {}
    names = sorted(set(listed) | (set() if remote else {p.name for p in root.glob("*.tar")}))
    reports = []
    for name in tqdm(names, desc="verify shards", unit=" shards"):
        if not remote and not (root / name).is_file():
            print(f"{name}: listed in {MANIFEST_NAME} but missing")
            problems += 1
            continue
        report = check_shard(f"{directory.rstrip('/')}/{name}" if remote else str(root / name), policy)
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
    parser = command_line("python -m data_prep.verify", __doc__)
    parser.add_argument("directory", help="a shard directory: local, or s3://, gs://, http(s):// with a manifest")
    parser.add_argument("--write-manifest", action="store_true", help="(re)write manifest.yaml (local directories)")
    defaults = DataConfig()
    parser.add_argument("--read-timeout", type=float, default=defaults.read_timeout_seconds,
                        help="seconds without progress before a read try fails (data.read_timeout_seconds)")
    parser.add_argument("--read-retries", type=int, default=defaults.read_retries,
                        help="tries after the first (data.read_retries)")
    args = parser.parse_args(argv)
    policy = ReadPolicy(timeout=args.read_timeout, retries=args.read_retries,
                        min_bytes_per_second=defaults.read_min_bytes_per_second)
    sys.exit(verify(args.directory, args.write_manifest, policy))


if __name__ == "__main__":
    main()
