"""Batched feature extraction with the model's eval transform."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.data.transforms import eval_transform
from pipeline.tokenizer import tokenize


def model_transform(model):
    return eval_transform(model.arch.image_size, model.arch.normalization)


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
