"""Fidelity fixes found by comparing against the reference code: each test states the
reference's behaviour (file and line of the reference it follows) and fails on the
behaviour we had before."""
import math

import pytest
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
    the stored value to [3, 6] around every step (objective.filip.logit_scale_min/max)."""
    from pipeline.config import FilipConfig
    from pipeline.train.engine import clamp_logit_scale
    from pipeline.losses.filip import filip_loss
    from pipeline.objectives import ComposedObjective, TrainModule
    from pipeline.tokenizer import tokenize
    torch.manual_seed(0)
    model = build_model("clip-tiny")
    cfg = ObjectiveConfig(weights={"filip": 1.0}, filip=FilipConfig(dim=16, top_k=0))
    module = TrainModule(model, ComposedObjective(cfg, model.arch)).eval()
    filip = module.objective.terms["filip"].heads
    with torch.no_grad():
        filip.logit_scale.fill_(5.5)  # a scale of 245: above CLIP's cap of 100
    images = torch.randn(4, 3, 64, 64)
    text = tokenize(["a dog", "a red car", "two cats on a mat", "seven"], model.arch.context_length)
    _, parts = module({"images": images, "text": text})
    with torch.no_grad():
        tokens_i = nn.functional.normalize(filip.image_proj(model.visual.hidden_tokens(images)[:, 1:]), dim=-1)
        tokens_t = nn.functional.normalize(filip.text_proj(model.text(text)), dim=-1)
    mask = torch.arange(text.shape[1])[None] <= text.argmax(-1)[:, None]
    expected = filip_loss(tokens_i, tokens_t, mask, torch.tensor(5.5).exp())
    torch.testing.assert_close(parts["loss_filip"].detach(), expected)

    bounds = module.logit_scale_bounds()
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
    from pipeline.train.trainer import Window
    window = Window()
    for loss, skipped in ((2.0, 0), (float("nan"), 1), (4.0, 0)):
        window.add({"loss": torch.tensor(loss), "skipped": skipped})
    assert window.steps == 3 and window.losses == 2 and window.skipped == 1
    assert window.mean_loss().item() == 3.0


def test_filip_alone_can_train_on_mlm_masked_captions_as_declips_filip_config(demo_data):
    """DeCLIP's yfcc15m_vit_filip config: `text_mask_type: MLM` with `masking_language:
    0.0`, so FILIP sees MLM-masked captions and no MLM loss is computed. Ours offers it as
    objective.mask_captions (off by default: FILIP's paper trains on clean captions)."""
    from pipeline.config import DataConfig
    from pipeline.data.loader import DataStream
    from pipeline.data.recipe import ImageSpec
    from pipeline.tokenizer import MASK_ID
    from pipeline.objectives import ComposedObjective, objective_arch
    arch = build_model("clip-tiny").arch
    cfg = DataConfig(train_shards=str(demo_data / "shards" / "photos"), workers=0, shuffle_buffer=0, readers=1)
    for masked in (False, True):
        objective_cfg = ObjectiveConfig(weights={"filip": 1.0}, mask_captions=masked)
        trained_arch = objective_arch(arch, objective_cfg)
        objective = ComposedObjective(objective_cfg, trained_arch)
        assert set(objective.terms) == {"filip"}
        assert (trained_arch.vocab_size > MASK_ID) == masked  # the mask token gets an embedding row
        batch = next(iter(DataStream(cfg, objective.recipe(), batch_size=16, image=ImageSpec(32, "clip"),
                                     context_length=16)))
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


def filip_only_export(tmp_path):
    """A FILIP-only model exported the way pipeline.weights.export.export writes one (its
    payload keys, the heads the trainer's module names), then loaded by load_exported."""
    from pipeline.weights.export import load_exported
    from pipeline.config import FilipConfig, to_dict
    from pipeline.model.heads import heads_for_export
    from pipeline.objectives import ComposedObjective, TrainModule, objective_arch
    cfg = ObjectiveConfig(weights={"filip": 1.0}, filip=FilipConfig(dim=16))
    torch.manual_seed(0)
    model = build_model(objective_arch(build_model("clip-tiny").arch, cfg))
    module = TrainModule(model, ComposedObjective(cfg, model.arch))
    with torch.no_grad():
        module.objective.terms["filip"].heads.logit_scale.fill_(4.0)
    path = tmp_path / "model.pt"
    torch.save({"state_dict": model.state_dict(), "heads": heads_for_export(module.state_dict(), module.export_heads()),
                "similarity": module.similarity, "arch": to_dict(model.arch), "model_name": "clip-tiny"}, path)
    return module, load_exported(path)[0]


def test_filip_only_runs_export_their_heads_and_are_evaluated_token_wise(tmp_path, demo_data):
    """DeCLIP's FILIP evaluates with its dense encoders and the token-wise similarity
    (filip_solver.py `evaluate`, `get_logits`). Before: the export dropped FILIP's heads
    and zero-shot used the pooled path, which a FILIP-only run never trains."""
    from eval import zeroshot
    from eval.data import read_classification
    from pipeline.objectives import trained_similarity
    trained, model = filip_only_export(tmp_path)
    assert model.similarity == "token"
    for name, value in trained.objective.terms["filip"].heads.state_dict().items():
        assert torch.equal(model.token_heads.state_dict()[name], value), name
    assert trained_similarity(ObjectiveConfig(weights={"clip": 1.0, "filip": 0.5})) == "pooled"
    data = read_classification(demo_data / "eval" / "digits", "test")
    data.images, data.labels = data.images[:40], data.labels[:40]
    before = zeroshot.evaluate(model, data, workers=0)
    with torch.no_grad():
        model.visual.proj.mul_(-1)  # the pooled projection: not what a token-wise eval reads
    assert zeroshot.evaluate(model, data, workers=0)["predictions"] == before["predictions"]
    with torch.no_grad():
        model.token_heads.image_proj.weight.normal_()  # FILIP's head: it is
    assert zeroshot.evaluate(model, data, workers=0)["predictions"] != before["predictions"]


def test_token_wise_zeroshot_and_retrieval_follow_a_naive_loop(tmp_path):
    """Zero-shot: per class the prompts' normalized tokens averaged position by position,
    divided by the Frobenius norm; score = mean over image tokens of the max over class
    tokens. Retrieval: FILIP's two directions over SOT..EOT caption tokens."""
    from PIL import Image
    from eval.data import RetrievalSet, image_loader
    from eval.features import (image_to_class_scores, image_tokens, model_transform, text_tokens,
                               zeroshot_token_classifier)
    from eval.retrieval import recalls, token_evaluate
    _, model = filip_only_export(tmp_path)
    g = torch.Generator().manual_seed(0)
    size = model.arch.image_size
    images = torch.rand(3, 3, size, size, generator=g)
    img = image_tokens(model, images)
    templates, classes = ["a photo of {c}.", "{c}"], ["zero", "one", "two"]
    cls = zeroshot_token_classifier(model, classes, templates)
    for c, name in enumerate(classes):
        tokens, _ = text_tokens(model, [t.format(c=name) for t in templates])
        expected = sum(tokens[p] for p in range(len(templates))) / len(templates)
        torch.testing.assert_close(cls[c], expected / expected.norm())
    scores = image_to_class_scores(img, cls)
    for b in range(3):
        for c in range(3):
            naive = sum(max(float(img[b, i] @ cls[c, l]) for l in range(cls.shape[1])) for i in range(img.shape[1]))
            assert scores[b, c].item() == pytest.approx(naive / img.shape[1], abs=1e-5)
    # retrieval on 3 images x 2 captions, written to disk as the readers read them
    files = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.fromarray((images[i].permute(1, 2, 0) * 255).byte().numpy()).save(path)
        files.append(str(path))
    captions = [["a red square", "red"], ["a photo of two dogs on a beach", "dogs"], ["three", "the number three"]]
    ours = token_evaluate(model, RetrievalSet("toy", files, captions), workers=0, chunk=2)
    img = torch.cat([image_tokens(model, x) for x in image_loader(files, model_transform(model), 8, 0)])
    flat = [c for caps in captions for c in caps]
    txt, mask = text_tokens(model, flat)
    i2t, t2i = torch.zeros(3, 6), torch.zeros(3, 6)
    for i in range(3):
        for j in range(6):
            sim = img[i] @ txt[j][mask[j]].T  # (image tokens, caption tokens)
            i2t[i, j] = sim.max(dim=1).values.mean()
            t2i[i, j] = sim.max(dim=0).values.mean()
    expected = recalls(i2t, torch.tensor([0, 0, 1, 1, 2, 2]), text_to_image=t2i)
    assert ours == pytest.approx(expected)
    assert not torch.allclose(i2t, t2i)  # the two directions differ: both are needed
