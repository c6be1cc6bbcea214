"""Composable objectives: what each term asks of the data and the model, that the
composed loss is the weighted sum of its terms computed from the model's outputs, that
every head and every encoder parameter (shared ones included) gets a gradient, and that
plain CLIP adds nothing."""
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ObjectiveConfig
from pipeline.losses import contrastive_loss
from pipeline.losses.filip import filip_loss
from pipeline.losses.slip import simclr_loss
from pipeline.model import build_model
from pipeline.objectives import attach_objective, without_objective_heads
from pipeline.tokenizer import tokenize

SMALL = dict(slip_mlp_dim=64, slip_out_dim=32, filip_dim=16, filip_top_k=4)
B = 6


def batch_for(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = model.arch.image_size
    images = [torch.randn(B, 3, size, size, generator=g) for _ in range(3)]
    captions = ["a photo of the digit " + "seven " * i for i in range(B)]  # lengths differ: padding varies
    return {"images": images[0], "ssl_0": images[1], "ssl_1": images[2],
            "text": tokenize(captions, model.arch.context_length)}


def test_plain_clip_attaches_nothing():
    model = build_model("msclip-s-tiny")
    n = sum(p.numel() for p in model.parameters())
    assert attach_objective(model, ObjectiveConfig()) is None
    assert not hasattr(model, "objective_heads") and sum(p.numel() for p in model.parameters()) == n


@pytest.mark.parametrize("name", ["clip-tiny", "msclip-tiny", "msclip-s-tiny"])
def test_composed_loss_is_the_weighted_sum_and_every_parameter_learns(name):
    torch.manual_seed(0)
    model = build_model(name)
    weights = {"clip": 0.5, "slip": 1.0, "filip": 0.25}
    objective = attach_objective(model, ObjectiveConfig(weights=weights, **SMALL))
    assert (objective.features_only, objective.needs_tokens, objective.ssl_views) == (False, True, 2)
    batch = batch_for(model)
    model.eval()  # BN in eval: the independent recomputation below sees the same statistics
    out = model(batch["images"], batch["text"], **objective.model_kwargs(batch, torch.float32))
    total, parts = objective(out, batch)

    # Each term recomputed from the model's own encoders, independently of the objective module.
    with torch.no_grad():
        img_f = model.encode_image(batch["images"], normalize=True)
        txt_f = model.encode_text(batch["text"], normalize=True)
        clip = contrastive_loss(img_f, txt_f, model.logit_scale.exp())
        slip_head = objective.terms["slip"].head
        slip = simclr_loss(slip_head(model.image_trunk(batch["ssl_0"])), slip_head(model.image_trunk(batch["ssl_1"])))
        f = objective.terms["filip"]
        # FILIP's image tokens come before ln_post (DeCLIP's visual_transformer return_dense)
        img_t = F.normalize(f.image_proj(model.visual.hidden_tokens(batch["images"])[:, 1:]), dim=-1)
        txt_t = F.normalize(f.text_proj(model.text(batch["text"])), dim=-1)
        eot = batch["text"].argmax(-1)
        mask = torch.arange(batch["text"].shape[1])[None] <= eot[:, None]
        assert mask.sum(1).unique().numel() > 1  # padding really varies across the batch
        filip = filip_loss(img_t, txt_t, mask, torch.tensor([math.log(1 / 0.07)]).exp(), top_k=4)
    for key, value in {"loss_clip": clip, "loss_slip": slip, "loss_filip": filip}.items():
        torch.testing.assert_close(parts[key].detach(), value, msg=key)
    torch.testing.assert_close(total.detach(), 0.5 * clip + 1.0 * slip + 0.25 * filip)

    model.train()
    out = model(batch["images"], batch["text"], **objective.model_kwargs(batch, torch.float32))
    objective(out, batch)[0].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == [], missing
    assert all(p.grad is not None for p in model.shared_parameters())


def test_exports_keep_the_encoders_only():
    model = build_model("msclip-s-tiny")
    attach_objective(model, ObjectiveConfig(weights={"clip": 1.0, "filip": 1.0}, **SMALL))
    kept = without_objective_heads(model.state_dict())
    assert any(k.startswith("objective_heads.") for k in model.state_dict())
    build_model("msclip-s-tiny").load_state_dict(kept)  # strict: exactly the plain model's keys


def test_a_clip_only_weight_still_scales_the_loss():
    model = build_model("clip-tiny")
    objective = attach_objective(model, ObjectiveConfig(weights={"clip": 0.5}))
    assert objective.features_only and objective.ssl_views == 0 and not objective.needs_tokens
    batch = batch_for(model)
    out = model(batch["images"], batch["text"])
    total, parts = objective(out, batch)
    torch.testing.assert_close(total, 0.5 * parts["loss_clip"])
    assert math.isfinite(total.item())


DECLIP = dict(weights={"clip": 0.4, "nn": 0.2, "simsiam": 0.2, "mlm": 0.2, "filip": 0.2}, image_views=2,
              view_augment="moco", text_eda=True, nn_queue_size=32, **SMALL)  # DeFILIP: DeCLIP + FILIP 0.2


def declip_batch(model, seed=0):
    from pipeline.losses.declip import mlm_mask
    batch = batch_for(model, seed)
    batch["images_1"] = batch.pop("ssl_0")
    batch["text_eda"] = tokenize(["digit seven photo " + "a " * i for i in range(B)], model.arch.context_length)
    batch["text"], batch["mlm_labels"] = mlm_mask(batch["text"], prob=0.5, generator=torch.Generator().manual_seed(seed))
    return batch


@pytest.mark.parametrize("name", ["clip-tiny", "msclip-tiny", "msclip-s-tiny"])
def test_defilip_is_the_weighted_sum_of_its_terms_and_every_parameter_learns(name):
    """DeCLIP's four terms (+ FILIP) recomputed from the encoders alone: the multi-view
    CLIP mean over 2 image x 2 text views, the image -> queue-neighbour loss with the
    neighbours looked up before the batch enters the queue, SimSiam on the two image
    views' embeddings, MLM on the masked text through the vocabulary head."""
    from pipeline.losses.declip import MASK_ID, mlm_loss, nn_loss
    from pipeline.objectives import objective_arch
    cfg = ObjectiveConfig(**DECLIP)
    torch.manual_seed(0)
    model = build_model(objective_arch(build_model(name).arch, cfg))
    assert model.arch.vocab_size == MASK_ID + 1  # the mask token is a real row of the embedding
    objective = attach_objective(model, cfg)
    assert objective.data_kwargs().items() >= {"views": 2, "view_augment": "moco", "ssl_views": 0, "text_eda": True,
                                               "eda_synonyms": "wordnet", "mlm_probability": 0.15}.items()
    batch = declip_batch(model)
    assert (batch["text"] == MASK_ID).any()
    model.eval()
    queue = objective.terms["nn"].queue
    before = queue.features.clone()
    out = model(batch["images"], batch["text"], **objective.model_kwargs(batch, torch.float32))
    total, parts = objective(out, batch)

    with torch.no_grad():
        images = [model.encode_image(batch[k]) for k in ("images", "images_1")]
        texts = [model.encode_text(batch[k]) for k in ("text", "text_eda")]
        normed_i, normed_t = [F.normalize(x, dim=-1) for x in images], [F.normalize(x, dim=-1) for x in texts]
        scale = model.logit_scale.exp()
        clip = sum(contrastive_loss(i, t, scale) for i in normed_i for t in normed_t) / 4
        neighbours = [before[(t @ before.T).argmax(1)] for t in normed_t]
        nn_term = sum(nn_loss(i, n, scale) for i in normed_i for n in neighbours) / 4
        simsiam = objective.terms["simsiam"].head(*images)
        mlm = mlm_loss(objective.terms["mlm"].head(model.text(batch["text"])), batch["mlm_labels"])
    expected = {"loss_clip": clip, "loss_nn": nn_term, "loss_simsiam": simsiam, "loss_mlm": mlm}
    for key, value in expected.items():
        torch.testing.assert_close(parts[key].detach(), value, msg=key)
    torch.testing.assert_close(total.detach(), 0.4 * clip + 0.2 * (nn_term + simsiam + mlm + parts["loss_filip"].detach()))
    # both text views entered the queue after the lookup: 2B newest slots, FIFO
    torch.testing.assert_close(queue.features[:2 * B], torch.cat(normed_t))
    assert queue.pointer.item() == 2 * B

    model.train()
    out = model(batch["images"], batch["text"], **objective.model_kwargs(batch, torch.float32))
    objective(out, batch)[0].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == [], missing


def test_mlm_without_a_mask_token_is_refused():
    with pytest.raises(ValueError, match=r"^objective\.weights\.mlm: .*no mask token"):
        attach_objective(build_model("clip-tiny"), ObjectiveConfig(weights={"clip": 1.0, "mlm": 0.5}))
    with pytest.raises(Exception, match=r"^objective\.weights\.simsiam: .*image_views: 2"):
        ObjectiveConfig(weights={"clip": 1.0, "simsiam": 0.5})
