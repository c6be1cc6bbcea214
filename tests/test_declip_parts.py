"""DeCLIP's building blocks: MLM masking ratios and what it never masks, SimSiam against
a naive loop (value and stop-gradient), the nearest-neighbour queue's FIFO order, size,
and neighbour-before-enqueue."""
import torch
import torch.nn.functional as F

from pipeline.data.caption_augment import mlm_mask
from pipeline.losses.declip import FeatureQueue, mlm_loss, simsiam_loss
from pipeline.tokenizer import EOT_ID, IGNORE_INDEX, MASK_ID, SOT_ID, get_tokenizer, tokenize


def test_special_ids_are_the_tokenizers():
    tok = get_tokenizer()
    assert (tok.sot_token_id, tok.eot_token_id) == (SOT_ID, EOT_ID) and MASK_ID == 49408


def test_mlm_masking_ratios_and_never_special_tokens():
    captions = [" ".join(f"word{i % 50} thing{j}" for j in range(1 + i % 12)) for i in range(4000)]
    text = tokenize(captions, 32)
    masked, labels = mlm_mask(text, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(text.shape[1])[None]
    eot = (text == EOT_ID).int().argmax(1, keepdim=True)
    real = (positions < eot) & (text != SOT_ID)
    selected = labels != IGNORE_INDEX
    assert not (selected & ~real).any()  # never SOT, EOT or padding
    assert (masked[~real] == text[~real]).all()  # and those positions stay untouched
    assert (labels[selected] == text[selected]).all()
    rate = selected.sum() / real.sum()
    assert abs(rate - 0.15) < 0.01, rate
    n = selected.sum().item()
    to_mask = (masked[selected] == MASK_ID).sum().item() / n
    unchanged = (masked[selected] == text[selected]).sum().item() / n
    random = 1 - to_mask - unchanged
    assert abs(to_mask - 0.8) < 0.02 and abs(unchanged - 0.1) < 0.02 and abs(random - 0.1) < 0.02
    assert (masked[selected & (masked != MASK_ID)] < SOT_ID).all()  # random replacements are ordinary tokens


def test_mlm_loss_is_cross_entropy_on_selected_positions_only():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 11, generator=g)
    labels = torch.full((3, 5), IGNORE_INDEX)
    labels[0, 1], labels[2, 3] = 4, 7
    expected = (-(logits[0, 1].log_softmax(0)[4]) - logits[2, 3].log_softmax(0)[7]) / 2
    torch.testing.assert_close(mlm_loss(logits, labels), expected)
    assert mlm_loss(logits, torch.full((3, 5), IGNORE_INDEX)).item() == 0.0


def test_simsiam_matches_naive_loop_and_stops_gradient_through_targets():
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(4, 6, generator=g, requires_grad=True) for _ in range(4))
    loss = simsiam_loss(p1, p2, z1, z2)
    naive = 0.0
    for i in range(4):
        naive = naive - (p1[i] @ z2[i] / (p1[i].norm() * z2[i].norm())) / 8 - (p2[i] @ z1[i] / (p2[i].norm() * z1[i].norm())) / 8
    torch.testing.assert_close(loss, naive)
    loss.backward()
    assert z1.grad is None and z2.grad is None and p1.grad.abs().sum() > 0


def test_queue_is_fifo_of_fixed_size_and_finds_neighbours_before_enqueue():
    torch.manual_seed(0)
    q = FeatureQueue(size=5, dim=3)
    assert q.features.shape == (5, 3)
    torch.testing.assert_close(q.features.norm(dim=1), torch.ones(5))  # random unit vectors at start
    e = torch.eye(3)
    q.push(e[:2])  # slots 0, 1
    q.push(torch.stack([e[2], -e[0], -e[1]]))  # slots 2, 3, 4
    torch.testing.assert_close(q.features, torch.stack([e[0], e[1], e[2], -e[0], -e[1]]))
    q.push(torch.stack([-e[2], 2 * e[0]]))  # wraps: the two oldest (slots 0, 1) are replaced, normalized
    torch.testing.assert_close(q.features, torch.stack([-e[2], e[0], e[2], -e[0], -e[1]]))
    assert q.pointer.item() == 2 and q.features.shape == (5, 3)
    # The neighbour comes from what was queued before: a batch never finds itself.
    batch = F.normalize(torch.tensor([[0.0, 0.9, 0.1]]), dim=-1)
    assert torch.equal(q.nearest(batch), e[2][None])  # (0, 1, 0) is not in the queue any more
    q.push(batch)
    torch.testing.assert_close(q.nearest(batch), batch)
