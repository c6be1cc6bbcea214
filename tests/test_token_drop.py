"""Token dropping (FLIP; model.token_drop, pipeline/model/token_drop.py): every tiny model
family on its kept tokens, the draw a seeded uniform subset per sample made by the loader,
evaluation on every token. The trainer's side (the unmasked phase, resume) is in
tests/test_trainer.py, exact accumulation's two passes in tests/test_engine.py, device
placement in tests/test_fake_cuda.py."""
import itertools
import math

import pytest
import torch

from pipeline.config import ConfigError, DataConfig, load_config
from pipeline.data.loader import DataStream
from pipeline.data.recipe import BatchRecipe, ImageSpec
from pipeline.data.samples import sample_seed
from pipeline.losses import contrastive_loss
from pipeline.model import build_model
from pipeline.model.configs import MODEL_CONFIGS
from pipeline.model.token_drop import draw_keep, gather_tokens, tokens_kept
from pipeline.tokenizer import tokenize

MODELS = [name for name in MODEL_CONFIGS if name.endswith("-tiny")]
B = 6


def inputs(model):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(B, 3, model.arch.image_size, model.arch.image_size, generator=g)
    text = tokenize([f"a photo of {i} things" for i in range(B)], model.arch.context_length)
    return images, text


def keeps(model, drop=0.5, salt=0):
    n = model.arch.grid_size ** 2
    return torch.stack([draw_keep(n, drop, torch.Generator().manual_seed(sample_seed(salt, i))) for i in range(B)])


@pytest.mark.parametrize("name", MODELS)
def test_keeping_every_token_is_the_model_without_dropping_bit_for_bit(name):
    """The dropping path itself changes nothing when nothing is dropped: gathering every
    position (and, for MS-CLIP-S, scattering back and fusing the branch there) gives the
    unmasked forward bit for bit; a real subset changes the features."""
    torch.manual_seed(0)
    model = build_model(name)
    images, text = inputs(model)
    every = torch.arange(model.arch.grid_size ** 2).expand(B, -1)
    plain = model(images, text, return_tokens=True)
    full = model(images, text, return_tokens=True, keep=every)
    for key in ("image_features", "text_features", "image_tokens"):
        assert torch.equal(plain[key], full[key]), key
    dropped = model(images, text, return_tokens=True, keep=keeps(model))
    assert dropped["image_tokens"].shape[1] == 1 + tokens_kept(model.arch.grid_size ** 2, 0.5)
    assert not torch.allclose(dropped["image_features"], plain["image_features"])
    assert torch.equal(dropped["text_features"], plain["text_features"])


def test_a_vit_on_kept_tokens_is_the_vit_on_those_tokens_alone():
    """clip-tiny (no convolutions after the patch embedding): the dropped forward equals
    running each image's kept tokens alone through ln_pre and the blocks, a naive loop
    that never sees a dropped token."""
    torch.manual_seed(0)
    model = build_model("clip-tiny")
    images, text = inputs(model)
    keep = keeps(model, drop=0.75)
    got = model.visual.hidden_tokens(images, keep)
    v = model.visual
    for b in range(B):
        x = v.stem(images[b:b + 1]).flatten(2).transpose(1, 2)  # (1, 16, D)
        x = torch.cat([v.class_embedding.expand(1, 1, -1), x], dim=1) + v.positional_embedding
        x = x[:, [0] + [1 + int(i) for i in keep[b]]]  # CLS and the kept patches, one sample
        x = v.ln_pre(x)
        for block in v.blocks:
            x = block(x)
        torch.testing.assert_close(got[b:b + 1], x, rtol=1e-5, atol=1e-5)
    assert torch.equal(gather_tokens(torch.arange(16.).view(1, 16, 1).expand(B, -1, 1), keep).squeeze(-1),
                       keep.float())


@pytest.mark.parametrize("name", MODELS)
def test_every_parameter_gets_a_gradient_with_half_the_tokens_dropped(name):
    torch.manual_seed(0)
    model = build_model(name)
    images, text = inputs(model)
    out = model(images, text, keep=keeps(model))
    contrastive_loss(out["image_features"], out["text_features"], out["logit_scale"]).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing, missing


@pytest.mark.parametrize("name", MODELS)
def test_evaluation_mode_sees_every_token_whatever_the_batch_says(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    images, text = inputs(model)
    with torch.no_grad():
        plain, given = model(images, text), model(images, text, keep=keeps(model))
    assert torch.equal(plain["image_features"], given["image_features"])


def test_the_kept_tokens_are_a_uniform_subset_per_sample():
    """draw_keep: k = int(n (1 - p)) distinct positions in ascending order; over many seeds
    every position is kept with probability k / n and every pair with k(k-1) / n(n-1)
    (a uniform k-subset; both within 5 binomial standard deviations); the same seed draws
    the same subset."""
    n, drop, draws = 16, 0.5, 4000
    k = tokens_kept(n, drop)
    assert (k, tokens_kept(49, 0.75), tokens_kept(4, 0.99)) == (8, 12, 1)
    rows = torch.stack([draw_keep(n, drop, torch.Generator().manual_seed(sample_seed(3, i))) for i in range(draws)])
    assert rows.shape == (draws, k)
    assert bool((rows[:, 1:] > rows[:, :-1]).all())  # ascending, so distinct
    member = torch.zeros(draws, n).scatter_(1, rows, 1.0)
    p1 = k / n
    assert (member.mean(0) - p1).abs().max() < 5 * math.sqrt(p1 * (1 - p1) / draws)
    p2 = k * (k - 1) / (n * (n - 1))
    pairs = (member.T @ member / draws)[torch.triu_indices(n, n, 1).unbind()]
    assert (pairs - p2).abs().max() < 5 * math.sqrt(p2 * (1 - p2) / draws)
    again = draw_keep(n, drop, torch.Generator().manual_seed(sample_seed(3, 17)))
    assert torch.equal(again, rows[17])
    assert len({tuple(r.tolist()) for r in rows[:200]}) > 190  # C(16, 8) = 12870 subsets


def loader_keeps(shards: str, world: int, workers: int, drop: float) -> dict:
    recipe = BatchRecipe(token_drop=drop, image_tokens=16)
    found = {}
    for rank in range(world):
        stream = DataStream(DataConfig(train_shards=shards, workers=workers, shuffle_buffer=20, readers=2,
                                       resampled=False), recipe,
                            batch_size=8 // world, image=ImageSpec(64, "clip"), context_length=16, seed=5,
                            rank=rank, world=world)
        for batch in itertools.islice(stream, 3):
            assert batch["token_keep"].shape == (8 // world, 8) and batch["token_keep"].dtype == torch.long
            found.update(zip(batch["keys"], map(tuple, batch["token_keep"].tolist())))
    return found


def test_the_loader_draws_each_samples_tokens_from_its_own_seed(demo_data):
    """The kept positions belong to the sample, like its crop: the same whichever rank and
    worker read it (1 process x 0 workers against 2 processes x 2 workers), and no
    token_keep at all without dropping."""
    shards = str(demo_data / "shards" / "digits")
    alone, spread = loader_keeps(shards, 1, 0, 0.5), loader_keeps(shards, 2, 2, 0.5)
    assert len(alone) == 24 and alone == spread
    assert len(set(alone.values())) > 20
    plain = DataStream(DataConfig(train_shards=shards, workers=0, readers=2), BatchRecipe(), batch_size=8,
                       image=ImageSpec(64, "clip"), context_length=16)
    assert "token_keep" not in next(iter(plain))


@pytest.mark.parametrize("override,message", [
    ("model.token_drop=1.0", "model.token_drop: 1.0 is outside [0, 1)"),
    ("model.token_drop=-0.1", "model.token_drop: -0.1 is outside [0, 1)"),
    ("train.unmasked_steps=300", "train.unmasked_steps: 300 is more than train.steps 200"),
])
def test_bad_token_drop_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_unmasked_steps_without_dropping_is_refused_before_launch(tmp_path, demo_data, repo_root, monkeypatch):
    from pipeline.train.preflight import check_run
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match="train.unmasked_steps: 5 unmasked steps, but model.token_drop is 0"):
        check_run(None, [f"data.train_shards={demo_data}/shards/photos", "data.readers=1",
                         f"train.output_dir={tmp_path}", "train.unmasked_steps=5"],
                  str(repo_root / "ds_configs" / "cpu_fp32.json"))
