"""DeCLIP's losses against naive references written with explicit loops (value and
gradient): the multi-view CLIP loss (every image view x text view), the image ->
nearest-neighbour text loss, MLM cross-entropy and SimSiam; the gathered ones (multi-view,
NN) also in 2 processes on gloo, where the per-rank results must add up to one big batch."""
import math

import torch
import torch.nn.functional as F

from loss_reference import assert_ranks_make_one_big_batch, assert_same, grads_of, on_ranks
from pipeline.config import ObjectiveConfig
from pipeline.losses.declip import mlm_loss, nn_loss, simsiam_loss
from pipeline.tokenizer import IGNORE_INDEX
from pipeline.model import build_model
from pipeline.objectives import ClipTerm

B, E, WORLD = 4, 6, 2


def naive_info_nce(queries: list, keys: list, scale, positive: int) -> torch.Tensor:
    """-log softmax_j(scale <q, k_j>)[positive] for one query."""
    logits = torch.stack([scale * (q_k) for q_k in [queries @ k for k in keys]])
    return -(logits[positive] - torch.logsumexp(logits, 0))


def naive_clip(img, txt, scale) -> torch.Tensor:
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        total = total + naive_info_nce(img[i], list(txt), scale, i) + naive_info_nce(txt[i], list(img), scale, i)
    return total / (2 * n)


def naive_multiview(images: list, texts: list, scale) -> torch.Tensor:
    """DeCLIP's L_MV: 1/(|I||T|) sum over image views v and text views w of CLIP(img_v, txt_w)."""
    pairs = [naive_clip(F.normalize(i, dim=-1), F.normalize(t, dim=-1), scale) for i in images for t in texts]
    return sum(pairs) / len(pairs)


def naive_nn(img, neighbours, scale) -> torch.Tensor:
    """Image -> neighbour text only; each image's own neighbour is its positive."""
    n = img.shape[0]
    return sum(naive_info_nce(img[i], list(neighbours), scale, i) for i in range(n)) / n


def make(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(n, E, generator=g) for _ in range(4)]  # image v1, v2, text orig, text EDA
    neighbours = F.normalize(torch.randn(n, E, generator=g), dim=-1)
    return views, neighbours, torch.tensor([math.log(1 / 0.07)])


def multiview_term():
    arch = build_model("clip-tiny").arch
    return ClipTerm(ObjectiveConfig(image_views=2, text_eda=True), arch)


def multiview_loss(i1, i2, t1, t2, log_scale):
    out = {"image_views": {"images": i1, "images_1": i2}, "text_views": {"text": t1, "text_eda": t2},
           "logit_scale": log_scale.exp()}
    loss, _ = multiview_term()(out, {})
    return loss


def nn_pair_loss(i1, log_scale, neighbours):
    return nn_loss(F.normalize(i1, dim=-1), neighbours, log_scale.exp())


def test_multiview_clip_matches_naive_loop():
    views, _, log_scale = make(B)
    ours = grads_of(multiview_loss, *views, log_scale)
    ref = grads_of(lambda i1, i2, t1, t2, s: naive_multiview([i1, i2], [t1, t2], s.exp()[0]), *views, log_scale)
    assert_same(ours, ref)


def test_nearest_neighbour_loss_matches_naive_loop_and_neighbours_get_no_gradient():
    views, neighbours, log_scale = make(B)
    ours = grads_of(lambda i, s: nn_pair_loss(i, s, neighbours), views[0], log_scale)
    ref = grads_of(lambda i, s: naive_nn(F.normalize(i, dim=-1), neighbours, s.exp()[0]), views[0], log_scale)
    assert_same(ours, ref)
    held = neighbours.clone().requires_grad_(True)
    nn_loss(F.normalize(views[0].requires_grad_(True), dim=-1), held, log_scale.exp()).backward()
    assert held.grad is None  # the queue's features are targets, not parameters


def test_mlm_loss_matches_naive_loop():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, 11, generator=g)
    labels = torch.full((3, 5), IGNORE_INDEX)
    selected = [(0, 1, 4), (1, 0, 2), (2, 3, 7), (2, 4, 0)]
    for b, pos, label in selected:
        labels[b, pos] = label

    def naive(x):
        return sum(-(x[b, pos] - torch.logsumexp(x[b, pos], 0))[label] for b, pos, label in selected) / len(selected)

    assert_same(grads_of(lambda x: mlm_loss(x, labels), logits), grads_of(naive, logits))


def test_simsiam_gradient_matches_naive_loop():
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(4, 6, generator=g) for _ in range(4)]

    def naive(p1, p2, z1, z2):
        total, z1, z2 = 0.0, z1.detach(), z2.detach()  # stop-gradient on the targets
        for i in range(4):
            total = total - (p1[i] @ z2[i]) / (p1[i].norm() * z2[i].norm()) / 8
            total = total - (p2[i] @ z1[i]) / (p2[i].norm() * z1[i].norm()) / 8
        return total

    assert_same(grads_of(simsiam_loss, *tensors), grads_of(naive, *tensors))


def _rank_results(rank: int) -> dict:
    local = slice(rank * B, (rank + 1) * B)
    views, neighbours, log_scale = make(WORLD * B)
    return {"multiview": grads_of(multiview_loss, *(v[local] for v in views), log_scale),
            "nn": grads_of(lambda i, s: nn_pair_loss(i, s, neighbours[local]), views[0][local], log_scale)}


def test_two_processes_equal_one_big_batch(tmp_path):
    """The mean of the per-rank losses is the big-batch loss; each rank's input gradient
    is world x the big-batch gradient of its rows (the gather's backward sums every
    rank's share); the logit scale's gradient averages to the big-batch one."""
    results = on_ranks(_rank_results, WORLD, tmp_path)
    views, neighbours, log_scale = make(WORLD * B)
    big = {
        "multiview": grads_of(lambda i1, i2, t1, t2, s: naive_multiview([i1, i2], [t1, t2], s.exp()[0]),
                              *views, log_scale),
        "nn": grads_of(lambda i, s: naive_nn(F.normalize(i, dim=-1), neighbours, s.exp()[0]), views[0], log_scale),
    }
    assert_ranks_make_one_big_batch(results, big, B)
