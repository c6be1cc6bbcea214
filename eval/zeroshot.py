"""Zero-shot classification (Radford et al. 2021, sec. 3.1.4): prompt-ensembled class embeddings, top-1,
top-5 and mean-per-class recall. Keys follow CLIP_benchmark's output."""
from __future__ import annotations

import torch
from sklearn.metrics import balanced_accuracy_score

from eval.data import ClassificationSet, image_loader
from eval.features import (FeatureCache, cached, image_features, image_to_class_scores, image_tokens,
                           model_transform, texts_key, token_similarity_model, zeroshot_token_classifier,
                           zeroshot_weights)


def topk_accuracy(logits: torch.Tensor, target: torch.Tensor, k: int) -> float:
    return (logits.topk(k, dim=1).indices == target[:, None]).any(dim=1).float().mean().item()


def evaluate(model, data: ClassificationSet, batch_size: int = 64, workers: int = 2, device: str = "cpu",
             cache: FeatureCache | None = None) -> dict:
    loader = image_loader(data.images, model_transform(model), batch_size, workers, data.labels)
    if token_similarity_model(model):
        logits, target = token_logits(model, data, loader, device)
    else:
        classifier = cached(cache, data.key, f"classifier-{texts_key(data.classnames, data.templates)}",
                            lambda: zeroshot_weights(model, data.classnames, data.templates, device))  # (E, C)
        feats, target = cached(cache, data.key, "image_labels", lambda: image_features(
            model, loader, device, desc=f"zero-shot {data.name}"))
        logits = 100.0 * feats @ classifier  # the scale does not change the ranking
    pred = logits.argmax(dim=1)
    metrics = {"acc1": topk_accuracy(logits, target, 1),
               "mean_per_class_recall": float(balanced_accuracy_score(target.numpy(), pred.numpy())),
               "predictions": pred.tolist(), "targets": target.tolist()}
    if len(data.classnames) >= 5:  # as CLIP_benchmark: top-5 of fewer classes means nothing
        metrics["acc5"] = topk_accuracy(logits, target, 5)
    return metrics


@torch.no_grad()
def token_logits(model, data: ClassificationSet, loader, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """FILIP-only models: token-wise image->class scores, batch by batch (the images'
    token embeddings are never all held at once)."""
    classes = zeroshot_token_classifier(model, data.classnames, data.templates, device).to(device)
    dtype = next(model.parameters()).dtype
    logits, targets = [], []
    for images, target in loader:
        logits.append(image_to_class_scores(image_tokens(model, images.to(device, dtype)), classes).cpu())
        targets.append(target)
    return torch.cat(logits), torch.cat(targets)
