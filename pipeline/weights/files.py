"""A run's checkpoints as files: which are complete, whether their bytes are intact, which
one `train.resume` means, and which ranks wrote it. Plain Python (no torch), so that
launch/train.py checks `train.resume` before torch or DeepSpeed is imported; saving and
loading are pipeline/weights/checkpoint.py's."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

COMPLETE = "COMPLETE.json"
TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def write_json_atomic(path: Path, payload: dict):
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def checksums(tag_dir: Path) -> dict[str, str]:
    """sha256 of every file of a checkpoint, recorded in its COMPLETE.json. Rank 0 reads
    all of them once every rank has written (a shared filesystem, as COMPLETE.json itself
    assumes): one more read of the checkpoint per save, paid so that a resume can tell
    bit-rot and truncation from a good checkpoint. The universal form a resume may add
    later (or a conversion's leftovers) is not part of it."""
    out = {}
    for path in sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != COMPLETE
                       and not p.relative_to(tag_dir).parts[0].lstrip(".").startswith(UNIVERSAL)):
        out[str(path.relative_to(tag_dir))] = file_sha256(path)
    return out


def file_sha256(path: str | Path) -> str:
    """A file's sha256, read in 4 MB chunks (checkpoint shards and released weights are GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def damage(tag_dir: Path) -> str:
    """Why a complete checkpoint cannot be trusted ("" if its files match their checksums;
    checkpoints from before checksums were recorded are taken as they are)."""
    recorded = json.loads((tag_dir / COMPLETE).read_text()).get("sha256")
    if recorded is None:
        return ""
    actual = checksums(tag_dir)
    for name, digest in recorded.items():
        if name not in actual:
            return f"{name} is missing"
        if actual[name] != digest:
            return f"{name} does not match its checksum"
    return ""


def complete_tags(ckpt_dir: str | Path) -> list[str]:
    """Complete checkpoints, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if TAG_RE.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(tags)


def prune(ckpt_dir: Path, keep_last: int):
    tags = complete_tags(ckpt_dir)
    keep = set(tags[-keep_last:])
    newest = tags[-1] if tags else None
    for p in ckpt_dir.iterdir():
        if not TAG_RE.match(p.name) or p.name in keep:
            continue
        if p.name in tags or (newest and p.name < newest):  # old complete ones, and debris of killed saves
            shutil.rmtree(p, ignore_errors=True)


def resolve_resume(resume: str, ckpt_dir: str | Path, verify: bool = False) -> tuple[Path, str] | None:
    """train.resume -> (checkpoint dir, tag), None to start fresh. With `verify` (rank 0,
    once, before loading) the files are checked against their checksums: resume=latest
    falls back to the newest intact checkpoint, saying so in one line; an explicitly named
    checkpoint that is damaged is an error."""
    if not resume:
        return None
    if resume in ("latest", "auto"):  # the newest complete checkpoint, else a fresh start
        tags = complete_tags(ckpt_dir)
        for tag in reversed(tags if verify else tags[-1:]):
            problem = damage(Path(ckpt_dir) / tag) if verify else ""
            if not problem:
                return Path(ckpt_dir), tag
            # moved aside: never picked again, never mistaken for complete while a later save
            # of the same step rewrites its files; kept for a post-mortem
            aside = Path(ckpt_dir) / f"{tag}.damaged"
            os.replace(Path(ckpt_dir) / tag, aside)
            print(f"[train] checkpoint {Path(ckpt_dir) / tag} is damaged ({problem}); moved to {aside.name}, "
                  f"resuming from the previous complete one", flush=True)
        if tags:
            raise FileNotFoundError(f"train.resume={resume}: none of the {len(tags)} complete checkpoints in "
                                    f"{ckpt_dir} is intact")
        return None
    path = Path(resume)
    if TAG_RE.match(path.name) and (path / COMPLETE).is_file():
        found = path.parent, path.name
    elif path.is_dir() and complete_tags(path):
        found = path, complete_tags(path)[-1]
    else:
        raise FileNotFoundError(f"train.resume: {resume} is not a complete checkpoint (no {COMPLETE})")
    problem = damage(found[0] / found[1]) if verify else ""
    if problem:
        raise FileNotFoundError(f"train.resume: {found[0] / found[1]} is damaged ({problem})")
    return found


UNIVERSAL = "universal"  # a checkpoint's DeepSpeed universal form, made when a resume needs it


def resume_facts(cfg, zero_stage: int) -> dict:
    """What a checkpoint fixes for any run that resumes it (recorded in COMPLETE.json):
    the model and its objective (the weights' names and shapes), and the data order."""
    return {"model.name": cfg.model.name, "model.overrides": dict(sorted(cfg.model.overrides.items())),
            "objective.weights": sorted(cfg.objective.weights), "data.readers": cfg.data.readers,
            "train.global_batch_size": cfg.train.global_batch_size, "zero_optimization.stage": zero_stage}


def needs_universal(written: dict, world: int, zero_stage: int) -> bool:
    """Whether the checkpoint's ZeRO partitions must go through DeepSpeed's universal form
    to load here (another world size or another ZeRO stage)."""
    return written["world_size"] != world or written.get("facts", {}).get("zero_optimization.stage",
                                                                              zero_stage) != zero_stage


def check_resumable(ckpt_dir: Path, tag: str, world: int, zero_stage: int, cfg=None) -> dict:
    """Before launch (launch/train.py, before any process group) and again at load: a
    checkpoint another model, objective or data order wrote is refused in one line naming
    the field; another world size or ZeRO stage is converted (DeepSpeed's universal
    checkpoint), except where DeepSpeed 0.19.8 cannot load the result. Returns the
    checkpoint's COMPLETE record."""
    path = Path(ckpt_dir) / tag
    written = json.loads((path / COMPLETE).read_text())
    facts = written.get("facts", {})
    if cfg is not None:
        for key, ours in resume_facts(cfg, zero_stage).items():
            if key in facts and key != "zero_optimization.stage" and facts[key] != ours:
                raise ValueError(f"train.resume: {path} was written with {key}={facts[key]}, this run has "
                                 f"{key}={ours}; a resume must keep it (start a new run with model.init_from to "
                                 f"reuse the weights)")
    if not needs_universal(written, world, zero_stage):
        return written
    if not facts:
        raise ValueError(f"train.resume: {path} was written by {written['world_size']} ranks, this run has {world}: "
                         f"checkpoints saved before data.readers existed keep a per-rank data position; resume "
                         f"it on {written['world_size']} processes")
    stages = (facts["zero_optimization.stage"], zero_stage)
    if not set(stages) <= {1, 2}:
        raise ValueError(f"train.resume: {path} was written with ZeRO stage {stages[0]} on {written['world_size']} "
                         f"processes, this run has stage {stages[1]} on {world}: a run moves to another world size or "
                         f"stage between ZeRO stages 1 and 2 only (through DeepSpeed 0.19.8's universal checkpoint, "
                         f"whose stage-3 loader wants per-rank model files its conversion does not write; stage-0 "
                         f"and stage-3 sources are not converted); resume with stage {stages[0]} on "
                         f"{written['world_size']} processes")
    return written


def save_blocker(ckpt_dir: Path) -> str:
    """Why a checkpoint cannot be written into `ckpt_dir` now ("" if nothing says so): the
    folder is not writable, or it has less free space than the newest complete checkpoint
    took. What cannot be seen beforehand (a quota hit midway) still fails the save."""
    ckpt_dir = Path(ckpt_dir)
    problem = not_writable(ckpt_dir)
    if problem:
        return problem
    tags = complete_tags(ckpt_dir)
    if not tags:
        return ""
    needed = sum(p.stat().st_size for p in (ckpt_dir / tags[-1]).rglob("*") if p.is_file())
    free = shutil.disk_usage(ckpt_dir).free
    if free < needed:
        return f"{free / 1e6:,.0f} MB free in {ckpt_dir}, the last checkpoint took {needed / 1e6:,.0f} MB"
    return ""


def not_writable(folder: Path) -> str:
    """Why nothing can be written into `folder` (made if missing), or "": a test write."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        return f"{folder} is not writable ({e.strerror or e})"
    return ""
