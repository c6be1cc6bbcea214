"""Composable objectives: what each term asks of the data and the model, that the
composed loss is the weighted sum of its terms computed from the encoder's outputs, that
every head and every encoder parameter (shared ones included) gets a gradient, that
plain CLIP adds nothing, and the per-term config sections."""
import math

import pytest
import torch
import torch.nn.functional as F

from loss_reference import assert_every_parameter_learns
from pipeline.config import ConfigError, ObjectiveConfig, load_config
from pipeline.data.recipe import BatchRecipe
from pipeline.losses import contrastive_loss
from pipeline.losses.filip import filip_loss
from pipeline.losses.slip import simclr_loss
from pipeline.model import build_model
from pipeline.objectives import ComposedObjective, TrainModule, objective_arch
from pipeline.tokenizer import tokenize

SMALL = dict(slip={"mlp_dim": 64, "out_dim": 32}, filip={"dim": 16, "top_k": 4})


def objective_cfg(**kwargs) -> ObjectiveConfig:
    """An objective section as a run config's YAML gives it (sub-sections as mappings)."""
    from pipeline.config import from_dict
    return from_dict(ObjectiveConfig, kwargs, "objective.")


def train_module(model, cfg: ObjectiveConfig) -> TrainModule:
    return TrainModule(model, ComposedObjective(cfg, model.arch))
B = 6


def batch_for(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = model.arch.image_size
    images = [torch.randn(B, 3, size, size, generator=g) for _ in range(3)]
    captions = ["a photo of the digit " + "seven " * i for i in range(B)]  # lengths differ: padding varies
    return {"images": images[0], "ssl_0": images[1], "ssl_1": images[2],
            "text": tokenize(captions, model.arch.context_length)}


def test_plain_clip_adds_nothing():
    model = build_model("msclip-s-tiny")
    module = train_module(model, ObjectiveConfig())
    assert module.objective.features_only and list(module.objective.terms) == ["clip"]
    assert [k[len("encoder."):] for k in module.state_dict()] == list(model.state_dict())
    assert module.objective.recipe() == BatchRecipe()  # images and text only


@pytest.mark.parametrize("name", ["clip-tiny", "msclip-tiny", "msclip-s-tiny"])
def test_composed_loss_is_the_weighted_sum_and_every_parameter_learns(name):
    torch.manual_seed(0)
    model = build_model(name)
    weights = {"clip": 0.5, "slip": 1.0, "filip": 0.25}
    module = train_module(model, objective_cfg(weights=weights, **SMALL))
    objective = module.objective
    assert (objective.features_only, objective.needs_tokens, objective.ssl_views) == (False, True, 2)
    batch = batch_for(model)
    module.eval()  # BN in eval: the independent recomputation below sees the same statistics
    total, parts = module(batch)

    # Each term recomputed from the model's own encoders, independently of the objective module.
    with torch.no_grad():
        img_f = model.encode_image(batch["images"], normalize=True)
        txt_f = model.encode_text(batch["text"], normalize=True)
        clip = contrastive_loss(img_f, txt_f, model.logit_scale.exp())
        slip_head = objective.terms["slip"].head
        slip = simclr_loss(slip_head(model.image_trunk(batch["ssl_0"])), slip_head(model.image_trunk(batch["ssl_1"])))
        f = objective.terms["filip"].heads
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

    module.train()
    module(batch)[0].backward()
    assert_every_parameter_learns(module)


def test_the_encoder_keeps_its_own_names_and_filip_heads_are_exported():
    """The trained module is `encoder.*` + `objective.*`: the encoder's weights load into a
    plain model, and the heads evaluation needs are named for the export."""
    module = train_module(build_model("msclip-s-tiny"), objective_cfg(weights={"clip": 1.0, "filip": 1.0}, **SMALL))
    state = module.state_dict()
    assert {k.split(".")[0] for k in state} == {"encoder", "objective"}
    build_model("msclip-s-tiny").load_state_dict(module.encoder.state_dict())  # strict: the plain model's keys
    from pipeline.model.heads import heads_for_export, token_heads
    heads = heads_for_export(state, module.export_heads())
    assert sorted(heads) == ["filip.image_proj.bias", "filip.image_proj.weight", "filip.logit_scale",
                             "filip.text_proj.bias", "filip.text_proj.weight"]
    rebuilt = token_heads(module.encoder.arch, heads)
    torch.testing.assert_close(rebuilt.image_proj.weight, module.objective.terms["filip"].heads.image_proj.weight)


def test_a_clip_only_weight_still_scales_the_loss():
    model = build_model("clip-tiny")
    module = train_module(model, ObjectiveConfig(weights={"clip": 0.5}))
    objective = module.objective
    assert objective.features_only and objective.ssl_views == 0 and not objective.needs_tokens
    batch = batch_for(model)
    total, parts = module(batch)
    with torch.no_grad():
        clip = contrastive_loss(model.encode_image(batch["images"], normalize=True),
                                model.encode_text(batch["text"], normalize=True), model.logit_scale.exp())
    torch.testing.assert_close(parts["loss_clip"].detach(), clip)
    torch.testing.assert_close(total.detach(), 0.5 * clip)


def test_each_term_reads_its_own_section_and_old_flat_keys_name_the_new_one():
    cfg = load_config(overrides=["objective.weights={clip: 1.0, filip: 1.0}", "objective.filip.top_k=8",
                                            "objective.slip.temperature=0.2"])
    assert (cfg.objective.filip.top_k, cfg.objective.slip.temperature, cfg.objective.filip.dim) == (8, 0.2, 256)
    assert ComposedObjective(cfg.objective, build_model("clip-tiny").arch).terms["filip"].top_k == 8
    for old, new in (("filip_top_k", "filip.top_k"), ("simclr_temperature", "slip.temperature"),
                     ("nn_queue_size", "nn.queue_size"), ("roi_dim", "pyramid.roi_dim")):
        with pytest.raises(ConfigError, match=rf"^config key 'objective\.{old}' has moved: "
                                              rf"write it as 'objective\.{new}'$"):
            load_config(overrides=[f"objective.{old}=1"])
    with pytest.raises(ConfigError, match=r"^unknown config key 'objective\.filip\.topk'"):
        load_config(overrides=["objective.filip.topk=1"])
    with pytest.raises(ConfigError, match=r"^objective\.filip\.top_k: -1 must be >= 0$"):
        load_config(overrides=["objective.filip.top_k=-1"])


DECLIP = dict(weights={"clip": 0.4, "nn": 0.2, "simsiam": 0.2, "mlm": 0.2, "filip": 0.2}, image_views=2,
              view_augment="moco", text_eda=True, nn={"queue_size": 32}, **SMALL)  # DeFILIP: DeCLIP + FILIP 0.2


def declip_batch(model, seed=0):
    from pipeline.data.caption_augment import mlm_mask
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
    from pipeline.losses.declip import mlm_loss, nn_loss
    from pipeline.tokenizer import MASK_ID

    cfg = objective_cfg(**DECLIP)
    torch.manual_seed(0)
    model = build_model(objective_arch(build_model(name).arch, cfg))
    assert model.arch.vocab_size == MASK_ID + 1  # the mask token is a real row of the embedding
    module = train_module(model, cfg)
    objective = module.objective
    assert objective.recipe() == BatchRecipe(views=2, view_augment="moco", text_eda=True, mlm_probability=0.15)
    batch = declip_batch(model)
    assert (batch["text"] == MASK_ID).any()
    module.eval()
    queue = objective.terms["nn"].queue
    before = queue.features.clone()
    total, parts = module(batch)

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

    module.train()
    module(batch)[0].backward()
    assert_every_parameter_learns(module)


def test_mlm_without_a_mask_token_is_refused():
    with pytest.raises(ValueError, match=r"^objective\.weights\.mlm: .*no mask token"):
        ComposedObjective(ObjectiveConfig(weights={"clip": 1.0, "mlm": 0.5}), build_model("clip-tiny").arch)
    with pytest.raises(Exception, match=r"^objective\.weights\.simsiam: .*image_views: 2"):
        ObjectiveConfig(weights={"clip": 1.0, "simsiam": 0.5})


ONE_STEP = {"clip": {"weights": {"clip": 1.0}}, "slip": {"weights": {"clip": 1.0, "slip": 1.0}},
            "filip": {"weights": {"filip": 1.0}}, "declip": {**DECLIP, "weights": {"clip": 0.4, "nn": 0.2,
                                                                                   "simsiam": 0.2, "mlm": 0.2}},
            "defilip": DECLIP, "pyramid": {"weights": {"pyramid": 1.0}}, "mixup": {"weights": {"mixup": 1.0}}}


@pytest.mark.parametrize("name", ONE_STEP)
def test_one_small_gradient_step_lowers_the_loss_of_a_fixed_batch(name):
    """What the training e2e tests once showed with "the loss fell by 0.1 in 30 steps",
    as a deterministic property of each objective: a small step against the gradient
    lowers the loss of the same batch (same mixup draw, same NN queue, same BN mode)."""
    torch.manual_seed(0)
    cfg = objective_cfg(**{**SMALL, **ONE_STEP[name]})
    model = build_model(objective_arch(build_model("msclip-s-tiny").arch, cfg))
    module = train_module(model, cfg)
    batch = declip_batch(model) if "mlm" in cfg.weights else {**batch_for(model), "images_1": batch_for(model, 1)["images"]}
    batch["text_eda"] = batch["text_summary"] = batch["text_tags"] = batch_for(model, 2)["text"].flip(0)
    batch = module.objective.prepare(batch)  # mixup's draw, once
    buffers = {k: v.clone() for k, v in module.named_buffers()}  # the NN queue, BN statistics
    before, _ = module(batch)
    before.backward()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    step = 1e-2 / torch.sqrt(sum((g ** 2).sum() for g in grads))  # a step of norm 0.01
    with torch.no_grad():
        for p in module.parameters():
            if p.grad is not None:
                p -= step * p.grad
        for key, value in module.named_buffers():
            value.copy_(buffers[key])
        after, _ = module(batch)
    assert after < before.detach(), (name, before.item(), after.item())
