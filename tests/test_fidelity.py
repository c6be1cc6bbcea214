"""Fidelity fixes found by comparing against the reference code: each test states the
reference's behaviour (file and line of the reference it follows) and fails on the
behaviour we had before."""
import math

import torch
from torch import nn

from pipeline.config import ObjectiveConfig
from pipeline.model import build_model


def test_parallel_branch_stage0_bn_keeps_pytorch_default_eps():
    """Hxyou/MSCLIP clip_openai_pe_res_v1.py: the branch's first stage is
    `build_conv_bn_relu` (nn.BatchNorm2d(output_dim), eps 1e-5); stages 1-4 are
    `Resnet_Stage`/`ConvResBlock` with eps=1e-6."""
    branch = build_model("msclip-s-tiny").visual.branch
    eps = [[m.eps for m in stage.modules() if isinstance(m, nn.BatchNorm2d)] for stage in branch.stages]
    assert eps[0] == [1e-5]
    assert all(e == 1e-6 for stage in eps[1:] for e in stage) and len(eps) > 1


def test_simsiam_projector_last_bn_is_affine():
    """DeCLIP's projection_MLP: bn3 = BN(hidden_dim), affine like every other BN."""
    from pipeline.losses.declip import SimSiamHead
    bns = [m for m in SimSiamHead(16).projector if isinstance(m, nn.BatchNorm1d)]
    assert len(bns) == 3 and all(bn.affine for bn in bns)


def test_filip_scale_has_no_forward_clamp_and_is_clamped_to_3_6_between_steps():
    """DeCLIP's FILIP: `logit_scale_dense.exp()` in the forward, unclamped; its runs clamp
    the stored value to [3, 6] around every step (objective.filip_logit_scale_min/max)."""
    from pipeline.engine import clamp_logit_scale
    from pipeline.losses.filip import filip_loss
    from pipeline.objectives import attach_objective, logit_scale_bounds
    from pipeline.tokenizer import tokenize
    torch.manual_seed(0)
    model = build_model("clip-tiny")
    cfg = ObjectiveConfig(weights={"filip": 1.0}, filip_dim=16, filip_top_k=0)
    objective = attach_objective(model, cfg).eval()
    filip = objective.terms["filip"]
    with torch.no_grad():
        filip.logit_scale.fill_(5.5)  # a scale of 245: above CLIP's cap of 100
    images = torch.randn(4, 3, 64, 64)
    text = tokenize(["a dog", "a red car", "two cats on a mat", "seven"], model.arch.context_length)
    batch = {"images": images, "text": text}
    out = model(images, text, **objective.model_kwargs(batch, torch.float32))
    _, parts = objective(out, batch)
    tokens_i = nn.functional.normalize(filip.image_proj(out["image_tokens"][:, 1:]), dim=-1)
    tokens_t = nn.functional.normalize(filip.text_proj(out["text_tokens"]), dim=-1)
    mask = torch.arange(text.shape[1])[None] <= text.argmax(-1)[:, None]
    expected = filip_loss(tokens_i, tokens_t, mask, torch.tensor(5.5).exp())
    torch.testing.assert_close(parts["loss_filip"], expected)

    bounds = logit_scale_bounds(model, cfg)
    assert [(p is filip.logit_scale, lo, hi) for p, lo, hi in bounds[1:]] == [(True, 3.0, 6.0)]
    assert bounds[0][0] is model.logit_scale and bounds[0][2] == math.log(100)
    for start, clamped in ((math.log(1 / 0.07), 3.0), (7.0, 6.0), (4.0, 4.0)):
        with torch.no_grad():
            filip.logit_scale.fill_(start)
        clamp_logit_scale(*bounds[1])
        assert filip.logit_scale.item() == clamped


def test_counting_flops_leaves_the_model_and_the_rng_untouched():
    """The count once ran a train-mode forward+backward of the trained model on rank 0
    only: BatchNorm statistics moved there alone and the global RNG advanced there alone."""
    from pipeline.model.flops import train_flops_per_sample
    model = build_model("msclip-s-tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    flops = train_flops_per_sample(model.arch)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert flops > 0


def test_a_skipped_step_does_not_poison_the_logged_loss():
    from launch.train import add_to_window, new_window
    window = new_window()
    for loss, skipped in ((2.0, 0), (float("nan"), 1), (4.0, 0)):
        add_to_window(window, {"loss": torch.tensor(loss), "skipped": skipped})
    assert window["steps"] == 3 and window["losses"] == 2
    assert (window["loss"] / window["losses"]).item() == 3.0


def test_filip_alone_can_train_on_mlm_masked_captions_as_declips_filip_config(demo_data):
    """DeCLIP's yfcc15m_vit_filip config: `text_mask_type: MLM` with `masking_language:
    0.0`, so FILIP sees MLM-masked captions and no MLM loss is computed. Ours offers it as
    objective.mask_captions (off by default: FILIP's paper trains on clean captions)."""
    from pipeline.config import DataConfig
    from pipeline.data.loader import DataStream
    from pipeline.losses.declip import MASK_ID
    from pipeline.objectives import ComposedObjective, objective_arch
    arch = build_model("clip-tiny").arch
    cfg = DataConfig(train_shards=str(demo_data / "shards" / "photos"), workers=0, shuffle_buffer=0)
    for masked in (False, True):
        objective_cfg = ObjectiveConfig(weights={"filip": 1.0}, mask_captions=masked)
        trained_arch = objective_arch(arch, objective_cfg)
        objective = ComposedObjective(objective_cfg, trained_arch)
        assert set(objective.terms) == {"filip"}
        assert (trained_arch.vocab_size > MASK_ID) == masked  # the mask token gets an embedding row
        batch = next(iter(DataStream(cfg, batch_size=16, image_size=32, normalization="clip", context_length=16,
                                     **objective.data_kwargs())))
        assert bool((batch["text"] == MASK_ID).any()) == masked


def test_declip_and_defilip_recipes_clip_no_gradient_norm():
    """DeCLIP's yfcc15m_vit_declip and _defilip configs: the `grad_clip` block is
    `logit_scale_param_value` (it clamps the logit scale, which objective.logit_scale_min
    and the FILIP bounds do); no gradient-norm clipping anywhere in those runs."""
    from pathlib import Path
    from pipeline.config import load_config
    recipes = Path(__file__).resolve().parents[1] / "launch" / "recipes"
    for name in ("declip-msclip-s-b32-yfcc.yaml", "defilip-msclip-s-b32-yfcc.yaml"):
        assert load_config(str(recipes / name)).optim.grad_clip == 0.0, name
