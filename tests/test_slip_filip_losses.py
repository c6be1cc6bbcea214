"""SLIP's NT-Xent and FILIP's token-wise loss against naive references written with
explicit loops (value and gradient), in 1 process and in 2 processes on gloo, where the
per-rank gradients must add up to the one-big-batch gradient."""
import math

import pytest
import torch
import torch.nn.functional as F

from loss_reference import assert_ranks_make_one_big_batch, grads_of, on_ranks
from pipeline.losses.filip import filip_loss, select_tokens
from pipeline.losses.slip import simclr_loss

B, D, N_IMG, N_TXT, WORLD, TAU = 4, 8, 5, 7, 2, 0.1


def naive_simclr(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """NT-Xent over the 2N views: each view's positive is its other view, every other view
    (not itself) is in the denominator; mean over the 2N views."""
    views = [F.normalize(v, dim=0) for v in [*a, *b]]
    n = a.shape[0]
    total = 0.0
    for i, q in enumerate(views):
        pos = (i + n) % (2 * n)
        others = [j for j in range(2 * n) if j != i]
        denom = torch.logsumexp(torch.stack([q @ views[j] / tau for j in others]), 0)
        total = total - (q @ views[pos] / tau - denom)
    return total / (2 * n)


def naive_pair_similarity(x: torch.Tensor, x_valid: list, y: torch.Tensor, y_valid: list) -> torch.Tensor:
    """Mean over x's valid tokens of the max over y's valid tokens."""
    per_token = [torch.stack([x[t] @ y[r] for r in y_valid]).max() for t in x_valid]
    return torch.stack(per_token).mean()


def naive_select(tokens, valid, paired, paired_valid, k):
    scores = {t: sum(float((tokens[t] @ paired[r]).detach()) for r in paired_valid) for t in valid}
    return sorted(scores, key=scores.get, reverse=True)[:k]


def naive_filip(img, txt, lengths, scale, top_k=None):
    n = img.shape[0]
    img_valid = [list(range(img.shape[1]))] * n
    txt_valid = [list(range(L)) for L in lengths]
    img_keys, txt_keys = img_valid, txt_valid
    if top_k:
        img_keys = [naive_select(img[i], img_valid[i], txt[i], txt_valid[i], top_k) for i in range(n)]
        txt_keys = [naive_select(txt[i], txt_valid[i], img[i], img_valid[i], top_k) for i in range(n)]
    total = 0.0
    for i in range(n):
        i2t = torch.stack([scale[0] * naive_pair_similarity(img[i], img_valid[i], txt[j], txt_keys[j]) for j in range(n)])
        t2i = torch.stack([scale[0] * naive_pair_similarity(txt[i], txt_valid[i], img[j], img_keys[j]) for j in range(n)])
        total = total - i2t.log_softmax(0)[i] - t2i.log_softmax(0)[i]
    return total / (2 * n)


def make_views(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)


def make_tokens(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, N_IMG, D, generator=g), dim=-1)
    txt = F.normalize(torch.randn(n, N_TXT, D, generator=g), dim=-1)
    lengths = [2 + (3 * i) % (N_TXT - 1) for i in range(n)]  # 2..N_TXT real tokens, the rest padding
    mask = torch.arange(N_TXT)[None] < torch.tensor(lengths)[:, None]
    txt = txt * mask[..., None]  # padding embeddings are zero, as they must not matter
    return img, txt, mask, lengths, torch.tensor([math.log(1 / 0.07)]).exp()


def test_simclr_matches_naive_loop():
    a, b = make_views(B)
    ours, ours_g = grads_of(lambda x, y: simclr_loss(x, y, TAU), a, b)
    ref, ref_g = grads_of(lambda x, y: naive_simclr(x, y, TAU), a, b)
    torch.testing.assert_close(ours, ref)
    for x, y in zip(ours_g, ref_g):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("top_k", [None, 3])
def test_filip_matches_naive_loop(top_k):
    img, txt, mask, lengths, scale = make_tokens(B)
    ours, ours_g = grads_of(lambda i, t, s: filip_loss(i, t, mask, s, top_k=top_k), img, txt, scale)
    ref, ref_g = grads_of(lambda i, t, s: naive_filip(i, t, lengths, s, top_k=top_k), img, txt, scale)
    torch.testing.assert_close(ours, ref)
    for x, y in zip(ours_g, ref_g):
        torch.testing.assert_close(x, y)


def test_filip_ignores_padding_and_selection_never_picks_it():
    img, txt, mask, _, scale = make_tokens(B)
    noisy = txt + (~mask)[..., None] * torch.randn_like(txt)  # garbage in the padding slots
    torch.testing.assert_close(filip_loss(img, noisy, mask, scale), filip_loss(img, txt, mask, scale))
    chosen, valid = select_tokens(noisy, mask, img, torch.ones(img.shape[:2], dtype=torch.bool), k=N_TXT)
    short = mask.sum(1).min().item()
    assert valid.sum(1).tolist() == mask.sum(1).tolist()  # every real token kept, padding flagged invalid
    assert short < N_TXT


def _rank_results(rank: int) -> dict:
    local = slice(rank * B, (rank + 1) * B)
    a, b = make_views(WORLD * B)
    img, txt, mask, _, scale = make_tokens(WORLD * B)
    results = {"simclr": grads_of(lambda x, y: simclr_loss(x, y, TAU), a[local], b[local])}
    for k in (None, 3):
        results[f"filip_{k}"] = grads_of(lambda i, t, s: filip_loss(i, t, mask[local], s, top_k=k),
                                         img[local], txt[local], scale)
    return results


def test_two_processes_equal_one_big_batch(tmp_path):
    """Each rank's loss is a mean over its rows against all gathered keys: the mean of the
    per-rank losses is the big-batch loss, and each rank's input gradient (the gather's
    backward sums every rank's share) is world x the big-batch gradient of its rows."""
    results = on_ranks(_rank_results, WORLD, tmp_path)
    a, b = make_views(WORLD * B)
    img, txt, mask, lengths, scale = make_tokens(WORLD * B)
    big = {"simclr": grads_of(lambda x, y: naive_simclr(x, y, TAU), a, b)}
    for k in (None, 3):
        big[f"filip_{k}"] = grads_of(lambda i, t, s: naive_filip(i, t, lengths, s, top_k=k), img, txt, scale)
    assert_ranks_make_one_big_batch(results, big, B)
