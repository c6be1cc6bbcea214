"""PyramidCLIP's softened-negative loss and ZeroVL's mixup loss against naive references
written with explicit loops (value and gradient), on 1 process and on 2 processes over
gloo; both reduce exactly to the plain CLIP loss (epsilon 0; mixup weight 1)."""
import math

import pytest
import torch
import torch.nn.functional as F

from loss_reference import assert_ranks_make_one_big_batch, assert_same, grads_of, on_ranks
from pipeline.losses import contrastive_loss
from pipeline.losses.soft import mixup_contrastive_loss, softened_contrastive_loss

B, E, WORLD, EPS, ALPHA = 4, 6, 2, 0.2, 0.3


def make(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, E, generator=g), dim=-1), F.normalize(torch.randn(n, E, generator=g), dim=-1),
            torch.tensor([math.log(1 / 0.07)]).exp())


def log_softmax_row(query, keys, scale):
    logits = [scale[0] * (query @ k) for k in keys]
    norm = torch.logsumexp(torch.stack(logits), 0)
    return [value - norm for value in logits]


def naive_softened(img, txt, scale, eps, block=None):
    """Each row: -(1-eps) log p(positive) - eps/(N-1) sum over negatives log p(negative).
    `block`: the rows a rank scores (its local batch) against all N columns."""
    n = img.shape[0]
    rows = range(n) if block is None else block
    total = 0.0
    for queries, keys in ((img, txt), (txt, img)):
        for i in rows:
            logp = log_softmax_row(queries[i], keys, scale)
            total = total - (1 - eps) * logp[i] - sum(eps / (n - 1) * logp[j] for j in range(n) if j != i)
    return total / (2 * len(rows))


def naive_mixup(img, txt, scale, alpha, local_blocks):
    """Per rank block, y = the block's global indices, flip(y) the same reversed:
    alpha x -log p(y_i) + (1 - alpha) x -log p(flip(y)_i), both directions, mean over rows."""
    total, count = 0.0, 0
    for block in local_blocks:
        flipped = list(reversed(block))
        for queries, keys in ((img, txt), (txt, img)):
            for row, i in enumerate(block):
                logp = log_softmax_row(queries[i], keys, scale)
                total = total - alpha * logp[i] - (1 - alpha) * logp[flipped[row]]
                count += 1
    return total / count


def test_softened_loss_matches_naive_loop():
    img, txt, scale = make(B)
    assert_same(grads_of(lambda i, t, s: softened_contrastive_loss(i, t, s, EPS), img, txt, scale),
                grads_of(lambda i, t, s: naive_softened(i, t, s, EPS), img, txt, scale))


def test_mixup_loss_matches_naive_loop():
    img, txt, scale = make(B)
    assert_same(grads_of(lambda i, t, s: mixup_contrastive_loss(i, t, s, ALPHA), img, txt, scale),
                grads_of(lambda i, t, s: naive_mixup(i, t, s, ALPHA, [list(range(B))]), img, txt, scale))


@pytest.mark.parametrize("loss", ["softened", "mixup"])
def test_without_softening_or_mixing_both_are_exactly_the_clip_loss(loss):
    img, txt, scale = make(B)
    fn = ((lambda i, t, s: softened_contrastive_loss(i, t, s, 0.0)) if loss == "softened" else
          (lambda i, t, s: mixup_contrastive_loss(i, t, s, 1.0)))
    ours = grads_of(fn, img, txt, scale)
    clip = grads_of(contrastive_loss, img, txt, scale)
    torch.testing.assert_close(ours[0], clip[0], rtol=0, atol=1e-6)  # the same sums, in another order
    for x, y in zip(ours[1], clip[1]):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def _rank_results(rank: int) -> dict:
    local = slice(rank * B, (rank + 1) * B)
    img, txt, scale = make(WORLD * B)
    return {"softened": grads_of(lambda i, t, s: softened_contrastive_loss(i, t, s, EPS), img[local], txt[local], scale),
            "mixup": grads_of(lambda i, t, s: mixup_contrastive_loss(i, t, s, ALPHA), img[local], txt[local], scale)}


def test_two_processes_equal_one_big_batch(tmp_path):
    """Each rank scores its rows against every rank's columns: the mean of the per-rank
    losses is the big-batch loss (mixup: each rank flips its own local batch), each rank's
    input gradient is world x the big-batch gradient of its rows (the gather's backward
    sums every rank's share), and the scale's gradients average to the big one."""
    results = on_ranks(_rank_results, WORLD, tmp_path)
    img, txt, scale = make(WORLD * B)
    blocks = [list(range(r * B, (r + 1) * B)) for r in range(WORLD)]
    big = {"softened": grads_of(lambda i, t, s: naive_softened(i, t, s, EPS), img, txt, scale),
           "mixup": grads_of(lambda i, t, s: naive_mixup(i, t, s, ALPHA, blocks), img, txt, scale)}
    assert_ranks_make_one_big_batch(results, big, B)
