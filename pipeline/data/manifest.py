"""The shard manifest: which tars a shard directory holds and how many samples each has.

data_prep.shard writes `manifest.yaml` next to img2dataset's shards (not .json:
img2dataset's incremental mode reads every *.json there as a shard's stats); the loader reads it
to know the epoch size and to balance shards across ranks; data_prep.verify checks it
against the tars.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import fsspec
import yaml

from pipeline.data.remote import ReadPolicy, is_remote, read_bytes

MANIFEST_NAME = "manifest.yaml"


@dataclass
class ShardInfo:
    name: str  # file name relative to the manifest's directory
    samples: int


@dataclass
class Manifest:
    shards: list[ShardInfo]
    # failures[status][reason] = count, e.g. {"failed_to_download": {"HTTP Error 404: Not Found": 3}}
    failures: dict[str, dict[str, int]] = field(default_factory=dict)
    source: str = ""

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def write(self, directory: str):
        text = yaml.safe_dump({"total_samples": self.total_samples, **asdict(self)}, sort_keys=False)
        if "://" in str(directory):  # object stores write whole objects
            with fsspec.open(f"{directory}/{MANIFEST_NAME}", "w") as f:
                f.write(text)
            return
        path = Path(directory) / MANIFEST_NAME
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)  # never a half-written manifest

    @classmethod
    def read(cls, directory: str | Path, policy: ReadPolicy = ReadPolicy()) -> "Manifest":
        """From a local directory or a remote one (http(s)://, s3://, ...: read with the
        loader's timeouts and retries)."""
        if is_remote(str(directory)):
            path = f"{str(directory).rstrip('/')}/{MANIFEST_NAME}"
            try:
                text = read_bytes(path, policy).decode()
            except FileNotFoundError:
                raise FileNotFoundError(f"{path}: no shard manifest (build shards with `python -m data_prep.shard`)"
                                        ) from None
        else:
            path = Path(directory) / MANIFEST_NAME
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no shard manifest (build shards with `python -m data_prep.shard`)")
            text = path.read_text()
        try:
            raw = yaml.safe_load(text)
            shards = [ShardInfo(str(s["name"]), int(s["samples"])) for s in raw["shards"]]
        except (yaml.YAMLError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
        return cls(shards=shards, failures=raw.get("failures", {}), source=raw.get("source", ""))
