"""Contrastive loss: value and gradient parity with open_clip's ClipLoss and with a
naive single-process loop, in 1 process and in 2 processes on gloo."""
import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from loss_reference import on_ranks
from pipeline.losses import all_gather_with_grad, contrastive_loss

B, E, WORLD = 6, 16, 2


def make_inputs(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, E, generator=g), dim=-1)
    txt = F.normalize(torch.randn(n, E, generator=g), dim=-1)
    return img, txt, torch.tensor([math.log(1 / 0.07)]).exp()


def naive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE written out sample by sample."""
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        i2t = torch.stack([scale[0] * img[i] @ txt[j] for j in range(n)])
        t2i = torch.stack([scale[0] * txt[i] @ img[j] for j in range(n)])
        total = total - i2t.log_softmax(0)[i] - t2i.log_softmax(0)[i]
    return total / (2 * n)


def grads_of(fn, *tensors):
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [l.grad for l in leaves]


@pytest.mark.parametrize("local_loss", [True, False])
def test_single_process_matches_open_clip_and_naive_loop(local_loss):
    img, txt, scale = make_inputs(B)
    ours, ours_g = grads_of(lambda i, t, s: contrastive_loss(i, t, s, local_loss=local_loss), img, txt, scale)
    ref, ref_g = grads_of(lambda i, t, s: ClipLoss()(i, t, s), img, txt, scale)
    naive, naive_g = grads_of(naive_loss, img, txt, scale)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(ours, naive)
    for a, b, c in zip(ours_g, ref_g, naive_g):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)


def _rank_results(rank: int) -> dict:
    img, txt, scale = make_inputs(WORLD * B)
    local = slice(rank * B, (rank + 1) * B)
    ours, ours_g = grads_of(lambda i, t, s: contrastive_loss(i, t, s, local_loss=True), img[local], txt[local], scale)
    ref, ref_g = grads_of(lambda i, t, s: ClipLoss(local_loss=True, gather_with_grad=True, rank=rank,
                                                   world_size=WORLD)(i, t, s), img[local], txt[local], scale)
    full, full_g = grads_of(lambda i, t, s: contrastive_loss(i, t, s, local_loss=False), img[local], txt[local], scale)
    return {"ours": (ours, ours_g), "ref": (ref, ref_g), "full": (full, full_g)}


def test_two_processes_match_open_clip_and_one_big_batch(tmp_path):
    results = on_ranks(_rank_results, WORLD, tmp_path)

    img, txt, scale = make_inputs(WORLD * B)
    big, big_g = grads_of(contrastive_loss, img, txt, scale)
    for rank, res in enumerate(results):
        local = slice(rank * B, (rank + 1) * B)
        ours, ours_g = res["ours"]
        ref, ref_g = res["ref"]
        torch.testing.assert_close(ours, ref)
        for a, b in zip(ours_g, ref_g):
            torch.testing.assert_close(a, b)
        # Each rank's gradient for its own rows is the big-batch gradient times the world size
        # (each rank's loss is a mean over its B rows; DeepSpeed then averages over ranks).
        torch.testing.assert_close(ours_g[0] / WORLD, big_g[0][local])
        torch.testing.assert_close(ours_g[1] / WORLD, big_g[1][local])
        # The non-local mode computes the whole (W*B)^2 matrix on every rank: same value.
        torch.testing.assert_close(res["full"][0], big)
    # Averaging the per-rank losses and the scale gradients gives the big-batch ones.
    torch.testing.assert_close(sum(r["ours"][0] for r in results) / WORLD, big)
    torch.testing.assert_close(sum(r["ours"][1][2] for r in results) / WORLD, big_g[2])


def test_gather_is_identity_without_process_group():
    x = torch.randn(3, 4, requires_grad=True)
    assert all_gather_with_grad(x) is x
