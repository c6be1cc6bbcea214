"""Batched feature extraction with the model's eval transform, and a cache of the
features one set of weights produced."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.data.transforms import eval_transform
from pipeline.tokenizer import tokenize


def model_transform(model):
    return eval_transform(model.arch.image_size, model.arch.normalization)


def weights_fingerprint(model) -> str:
    """sha256 of the weights (names, dtypes, shapes, bytes) and of how the model is measured:
    the same weights give the same features whatever file or format they came from."""
    digest = hashlib.sha256(getattr(model, "similarity", "pooled").encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FeatureCache:
    """Features of one set of weights on disk, so that a suite run again, resumed after a
    kill or given one more dataset computes nothing twice:
    `<root>/features/<weights fingerprint>/<dataset key>/<kind>.pt`. A dataset's key names
    its resolved location and split (eval/data.py), so two sets called `digits` do not
    share features. Files are written whole (temp + rename) and read weights-only."""

    def __init__(self, root: str | Path, fingerprint: str):
        self.dir = Path(root) / "features" / fingerprint[:32]
        self.computed: list[str] = []  # what this process computed rather than read

    def get(self, dataset_key: str, kind: str, compute: Callable):
        path = self.dir / dataset_key / f"{kind}.pt"
        if path.is_file():
            try:
                return torch.load(path, weights_only=True)
            except Exception:  # noqa: BLE001 (unreadable: computed again and rewritten)
                pass
        value = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save(value, tmp)
        os.replace(tmp, path)
        self.computed.append(f"{dataset_key}/{kind}")
        return value


def cached(cache: FeatureCache | None, dataset_key: str, kind: str, compute: Callable):
    return compute() if cache is None or not dataset_key else cache.get(dataset_key, kind, compute)


def texts_key(*groups: list[str]) -> str:
    """A short name for a list of prompts or class names (the classifier they make)."""
    return hashlib.sha256("\x00".join("\x01".join(g) for g in groups).encode()).hexdigest()[:16]


@torch.no_grad()
def image_features(model, loader, device: str = "cpu", projected: bool = True, desc: str = "images"):
    """(N, E) L2-normalized joint-space features, or (N, D) pre-projection features
    (CLIP's linear-probe features) when projected=False; plus the targets if the loader has them."""
    feats, targets = [], []
    dtype = next(model.parameters()).dtype  # bf16 when called on a bf16 engine's module
    for batch in tqdm(loader, desc=desc, unit=" batches", leave=False):
        images, target = batch if isinstance(batch, (list, tuple)) else (batch, None)
        images = images.to(device, dtype)
        x = model.encode_image(images, normalize=True) if projected else model.image_trunk(images)
        feats.append(x.float().cpu())
        if target is not None:
            targets.append(target)
    return torch.cat(feats), (torch.cat(targets) if targets else None)


@torch.no_grad()
def text_features(model, texts: list[str], device: str = "cpu", batch_size: int = 256) -> torch.Tensor:
    """(T, E) L2-normalized text features."""
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenize(texts[i:i + batch_size], model.arch.context_length).to(device)
        out.append(model.encode_text(tokens, normalize=True).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def zeroshot_weights(model, classnames: list[str], templates: list[str], device: str = "cpu") -> torch.Tensor:
    """(E, C): per class, the mean of its L2-normalized prompt embeddings, renormalized
    (OpenAI's prompt ensembling)."""
    weights = []
    for name in classnames:
        emb = text_features(model, [t.format(c=name) for t in templates], device)  # (templates, E)
        weights.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(weights, dim=1)


# ---- token-wise (FILIP) features: models whose export says similarity "token" ----------

def token_similarity_model(model) -> bool:
    """Whether evaluation measures this model token-wise (an export of a FILIP-only run)."""
    return getattr(model, "similarity", "pooled") == "token"


@torch.no_grad()
def image_tokens(model, images: torch.Tensor) -> torch.Tensor:
    """(B, n, D) L2-normalized FILIP patch embeddings (patch tokens before ln_post, as trained)."""
    return model.token_heads.image_tokens(model.visual.hidden_tokens(images))


@torch.no_grad()
def text_tokens(model, texts: list[str], device: str = "cpu", batch_size: int = 256):
    """(T, L, D) L2-normalized FILIP token embeddings of every position, and (T, L) True on
    SOT..EOT (the tokens FILIP trains on)."""
    feats, masks = [], []
    for i in range(0, len(texts), batch_size):
        tokens = tokenize(texts[i:i + batch_size], model.arch.context_length).to(device)
        feats.append(model.token_heads.text_tokens(model.text(tokens)).cpu())
        masks.append(model.token_heads.text_mask(tokens).cpu())
    return torch.cat(feats), torch.cat(masks)


@torch.no_grad()
def zeroshot_token_classifier(model, classnames: list[str], templates: list[str], device: str = "cpu") -> torch.Tensor:
    """(C, L, D): DeCLIP's FILIP zero-shot classifier (prototype/solver/filip_solver.py
    `evaluate`): per class, the prompts' normalized token embeddings averaged position by
    position over the templates (every position, padding included, as the reference), then
    divided by the Frobenius norm of the result."""
    classes = []
    for name in classnames:
        tokens, _ = text_tokens(model, [t.format(c=name) for t in templates], device)  # (P, L, D)
        mean = tokens.mean(dim=0)
        classes.append(mean / mean.norm())
    return torch.stack(classes)


def image_to_class_scores(images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(B, n, D) x (C, L, D) -> (B, C): mean over the image's tokens of the max over the
    class's tokens (the reference's `get_logits`)."""
    return torch.einsum("bnd,cld->bcnl", images, classes).max(dim=-1).values.mean(dim=-1)
