"""Image-text retrieval (ZeroVL's protocol, zerovl/ZeroVL
tools/retrieval_evaluation.py): R@1/5/10 both ways and RSUM, where an image
has several captions. Keys follow CLIP_benchmark: `text_retrieval_recall@k` is
image->text, `image_retrieval_recall@k` is text->image.

Ties are counted against the query: a wrong candidate scoring exactly as high as the
best right one ranks ahead of it (recall is never overstated)."""
from __future__ import annotations

import torch

from eval.data import RetrievalSet, image_loader
from eval.features import (FeatureCache, cached, image_features, image_tokens, model_transform, text_features,
                           text_tokens, token_similarity_model)
from pipeline.losses.filip import token_similarity


def recalls(scores: torch.Tensor, caption_image: torch.Tensor, ks=(1, 5, 10),
            text_to_image: torch.Tensor | None = None) -> dict:
    """scores: (N_images, N_captions); caption_image[j]: the image caption j describes.
    text_to_image: the text->image scores when they differ from image->text (FILIP's
    token-wise similarity is not symmetric), same layout."""
    n_img, n_txt = scores.shape
    positive = torch.zeros(n_img, n_txt, dtype=torch.bool)
    positive[caption_image, torch.arange(n_txt)] = True
    # image -> text: rank of the best right caption = wrong captions scoring >= it
    best_right = scores.masked_fill(~positive, float("-inf")).max(dim=1).values  # (N_images,)
    i2t_rank = (scores.masked_fill(positive, float("-inf")) >= best_right[:, None]).sum(dim=1)
    # text -> image: wrong images scoring >= the right one
    t2i = scores if text_to_image is None else text_to_image
    right = t2i[caption_image, torch.arange(n_txt)]  # (N_captions,)
    t2i_rank = (t2i.masked_fill(positive, float("-inf")) >= right[None, :]).sum(dim=0)
    out = {}
    for k in ks:
        out[f"text_retrieval_recall@{k}"] = (i2t_rank < k).float().mean().item()
        out[f"image_retrieval_recall@{k}"] = (t2i_rank < k).float().mean().item()
    out["rsum"] = 100.0 * sum(out[f"{d}_retrieval_recall@{k}"] for d in ("text", "image") for k in ks)
    return out


def evaluate(model, data: RetrievalSet, batch_size: int = 64, workers: int = 2, device: str = "cpu",
             cache: FeatureCache | None = None) -> dict:
    if token_similarity_model(model):
        return token_evaluate(model, data, batch_size, workers, device)
    img, _ = cached(cache, data.key, "image", lambda: image_features(
        model, image_loader(data.images, model_transform(model), batch_size, workers), device,
        desc=f"retrieval {data.name}"))
    captions = [c for caps in data.captions for c in caps]
    caption_image = torch.tensor([i for i, caps in enumerate(data.captions) for _ in caps])
    txt = cached(cache, data.key, "captions", lambda: text_features(model, captions, device))
    return recalls(img @ txt.T, caption_image)


@torch.no_grad()
def token_evaluate(model, data: RetrievalSet, batch_size: int = 64, workers: int = 2, device: str = "cpu",
                   chunk: int = 256) -> dict:
    """FILIP-only models, as FILIP retrieves: image->text scores are the mean over the
    image's tokens of the max over the caption's (SOT..EOT) tokens, text->image the mean
    over the caption's tokens of the max over the image's; computed in chunks of images."""
    dtype = next(model.parameters()).dtype
    img = torch.cat([image_tokens(model, images.to(device, dtype)).cpu()
                     for images in image_loader(data.images, model_transform(model), batch_size, workers)])
    captions = [c for caps in data.captions for c in caps]
    caption_image = torch.tensor([i for i, caps in enumerate(data.captions) for _ in caps])
    txt, txt_mask = text_tokens(model, captions, device)
    img_mask = torch.ones(img.shape[:2], dtype=torch.bool)
    i2t = torch.cat([token_similarity(img[i:i + chunk], img_mask[i:i + chunk], txt, txt_mask)
                     for i in range(0, len(img), chunk)])
    t2i = torch.cat([token_similarity(txt[j:j + chunk], txt_mask[j:j + chunk], img, img_mask)
                     for j in range(0, len(txt), chunk)]).T
    return recalls(i2t, caption_image, text_to_image=t2i)
