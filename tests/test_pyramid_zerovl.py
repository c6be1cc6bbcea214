"""PyramidCLIP's and ZeroVL's data and objective mechanics: debiased sampling (the same
source on every rank, chosen in proportion to size), coin-flipping mixup (pixel mixing,
shared draws that resume), the pyramid's text levels and region features from the shards,
the ROI path through the last vision blocks, and the composed pyramid loss recomputed from
the encoders."""
import dataclasses
import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from loss_reference import assert_every_parameter_learns
from pipeline.config import DataConfig, FilipConfig, ObjectiveConfig, PyramidConfig
from pipeline.data.debiased import DebiasedStream, choose_source
from pipeline.data.loader import DataStream
from pipeline.data.pyramid import summary_text, tags_text
from pipeline.data.recipe import BatchRecipe, ImageSpec
from pipeline.losses.soft import softened_contrastive_loss
from pipeline.model import build_model
from pipeline.objectives import ComposedObjective, TrainModule, objective_arch
from pipeline.tokenizer import tokenize


# ---- ZeroVL: debiased sampling ----------------------------------------------------------

def test_sources_are_chosen_in_proportion_to_their_sizes():
    """20,000 steps over sizes 6000/3000/1000: each source's share is within 4 standard
    deviations of its probability (binomial sd = sqrt(p(1-p)/n) ~ 0.0035 at p 0.5), a
    tolerance a correct sampler fails about once in 15,000 runs."""
    sizes, n = [6000, 3000, 1000], 20_000
    picks = np.bincount([choose_source(7, step, sizes) for step in range(n)], minlength=3)
    for count, size in zip(picks, sizes):
        p = size / sum(sizes)
        assert abs(count / n - p) < 4 * math.sqrt(p * (1 - p) / n), (picks, sizes)
    assert [choose_source(7, s, sizes) for s in range(50)] == [choose_source(7, s, sizes) for s in range(50)]
    assert [choose_source(7, s, sizes) for s in range(50)] != [choose_source(8, s, sizes) for s in range(50)]


def _debiased_worker(rank: int, port: int, shards: str, out_path: str):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg = DataConfig(train_shards=shards, workers=1, shuffle_buffer=0, sampling="debiased")
        stream = DebiasedStream(cfg, batch_size=8, image=ImageSpec(32, "clip"), context_length=16, seed=3,
                                rank=dist.get_rank(), world=dist.get_world_size())
        steps = []
        for batch in stream:
            steps.append((batch["source"], batch["keys"]))
            if len(steps) == 24:
                break
        gathered = [None, None]
        dist.all_gather_object(gathered, steps)  # what every rank drew, compared on rank 0
        if rank == 0:
            torch.save({"steps": gathered, "sizes": stream.sizes}, out_path)
    finally:
        dist.destroy_process_group()


def test_two_ranks_take_every_step_from_the_same_source(tmp_path, demo_data):
    from conftest import free_port
    shards = f"{demo_data}/shards/digits::{demo_data}/shards/photos"
    out = tmp_path / "steps.pt"
    mp.spawn(_debiased_worker, args=(free_port(), shards, str(out)), nprocs=2, join=True)
    result = torch.load(out, weights_only=False)
    rank0, rank1 = result["steps"]
    sources = [s for s, _ in rank0]
    assert sources == [s for s, _ in rank1] == [choose_source(3, step, result["sizes"]) for step in range(24)]
    assert set(sources) == {0, 1}, sources  # seed 3 draws photos (450 of 5,478 samples) at steps 9, 14, 16
    names = ("digits", "photos")
    for source, keys in [*rank0, *rank1]:  # the whole global batch comes from the chosen source
        assert all(f"/shards/{names[source]}/" in key for key in keys), (source, keys)


# ---- ZeroVL: coin-flipping mixup ----------------------------------------------------------

def test_mixup_mixes_pixels_with_the_reversed_batch_and_its_draws_resume():
    cfg = ObjectiveConfig(weights={"mixup": 1.0})
    arch = build_model("clip-tiny").arch
    objective = ComposedObjective(cfg, arch)
    images = torch.randn(6, 3, 64, 64)
    draws = []
    for _ in range(40):
        batch = objective.prepare({"images": images, "text": torch.zeros(6, 32, dtype=torch.long)})
        alpha, side = batch["mixup"]
        draws.append((alpha, side))
        expected = alpha * images + (1 - alpha) * images.flip(0) if side == "image" else images
        torch.testing.assert_close(batch["images"], expected)
    assert {side for _, side in draws} == {"image", "text"}
    alphas = np.array([a for a, _ in draws])
    assert ((alphas < 0.1) | (alphas > 0.9)).mean() > 0.5  # Beta(0.1, 0.1) piles up near 0 and 1

    # Same seed, same sequence (every rank); a model restored from a state dict continues it.
    fresh = ComposedObjective(cfg, arch)
    assert [fresh.terms["mixup"].draw() for _ in range(25)] == draws[:25]
    restored = ComposedObjective(cfg, arch)
    restored.load_state_dict(fresh.state_dict())
    assert [restored.terms["mixup"].draw() for _ in range(15)] == draws[25:]


def test_mixup_composed_with_the_model_scores_text_mixing_on_embeddings():
    from pipeline.losses.soft import mixup_contrastive_loss
    torch.manual_seed(0)
    model = build_model("msclip-s-tiny").eval()
    module = TrainModule(model, ComposedObjective(ObjectiveConfig(weights={"mixup": 1.0}), model.arch))
    captions = [f"a photo of the digit {i}" for i in range(6)]
    batch = {"images": torch.randn(6, 3, 64, 64), "text": tokenize(captions, 32), "mixup": (0.3, "text")}
    total, parts = module(batch)
    with torch.no_grad():
        text = model.encode_text(batch["text"])
        mixed = F.normalize(0.3 * text + 0.7 * text.flip(0), dim=-1)
        expected = mixup_contrastive_loss(model.encode_image(batch["images"], normalize=True), mixed,
                                          model.logit_scale.exp(), 0.3)
    torch.testing.assert_close(total.detach(), expected)


# ---- PyramidCLIP: text levels, regions, the ROI path ---------------------------------------

def test_text_levels_read_metadata_and_fall_back_on_the_caption():
    caption = "A red car parked on the street. The driver is away."
    assert summary_text(caption, {"summary": "a parked car"}) == "a parked car"
    assert summary_text(caption, {}) == "A red car parked on the street"  # the first sentence
    assert summary_text("one two three four five six seven eight nine ten", {}) == "one two three four five six seven eight"
    assert tags_text(caption, {"tags": "car, street,, red "}) == "car, street, red"
    assert tags_text(caption, {"tags": ""}) == "red, car, parked, street, driver, away"  # no stop words


def write_roi_shard(path, rois_per_sample, dim=12):
    from PIL import Image
    with tarfile.open(path, "w") as tar:
        for i, count in enumerate(rois_per_sample):
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), (10 * i, 50, 90)).save(buf, format="JPEG")
            files = {"jpg": buf.getvalue(), "txt": f"a photo of thing {i}".encode(),
                     "json": json.dumps({"tags": f"thing, number {i}"}).encode()}
            if count is not None:
                arr = io.BytesIO()
                np.save(arr, np.full((count, dim), float(i + 1), dtype=np.float32))
                files["roi.npy"] = arr.getvalue()
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_loader_reads_regions_pads_them_and_counts_samples_without_them(tmp_path):
    shard = tmp_path / "00000.tar"
    write_roi_shard(shard, [3, 15, None, 1])
    cfg = DataConfig(train_shards=str(shard), workers=0, shuffle_buffer=0, max_skip_rate=0.5, resampled=False)
    stream = DataStream(cfg, BatchRecipe(views=2, view_augment="pyramid", text_levels=True, max_rois=10, roi_dim=12),
                        batch_size=3, image=ImageSpec(32, "clip"), context_length=16, drop_last=False)
    (batch,) = list(stream)
    assert batch["rois"].shape == (3, 10, 12) and batch["roi_mask"].sum(1).tolist() == [3, 10, 1]
    assert batch["rois"][0, :3].eq(1).all() and batch["rois"][0, 3:].eq(0).all() and batch["rois"][2, 0].eq(4).all()
    assert stream.skipped() == {"missing_roi": 1}  # sample 2 has no regions: counted, not fatal
    assert torch.equal(batch["text_tags"], tokenize(["thing, number 0", "thing, number 1", "thing, number 3"], 16))
    assert torch.equal(batch["text_summary"], tokenize([f"a photo of thing {i}" for i in (0, 1, 3)], 16))


def test_roi_path_uses_the_last_three_blocks_and_ignores_padding():
    torch.manual_seed(0)
    model = build_model(objective_arch(build_model("msclip-s-tiny").arch, ObjectiveConfig(
        weights={"pyramid": 1.0}, pyramid=PyramidConfig(rois=4, roi_dim=12)))).eval()
    rois, mask = torch.randn(2, 4, 12), torch.tensor([[True, True, False, False], [True, True, True, True]])
    base = model.visual.encode_rois(rois, mask)
    padded = rois.clone()
    padded[0, 2:] = 100.0  # garbage in the padding slots
    torch.testing.assert_close(model.visual.encode_rois(padded, mask), base)
    with torch.no_grad():
        model.visual.blocks[0].mlp.c_fc.weight.add_(1.0)  # an early block: not on the ROI path
        torch.testing.assert_close(model.visual.encode_rois(rois, mask), base)
        model.visual.blocks[-1].mlp.c_fc.weight.add_(1.0)  # the last block is
        assert not torch.allclose(model.visual.encode_rois(rois, mask), base)


@pytest.mark.parametrize("rois", [0, 4])
def test_pyramid_loss_is_peer_plus_cross_from_the_encoders(rois):
    torch.manual_seed(0)
    cfg = ObjectiveConfig(weights={"pyramid": 1.0}, pyramid=PyramidConfig(rois=rois, roi_dim=12, cross_weight=0.5))
    model = build_model(objective_arch(build_model("msclip-s-tiny").arch, cfg)).eval()
    module = TrainModule(model, ComposedObjective(cfg, model.arch))
    assert module.objective.recipe() == BatchRecipe(views=2, view_augment="pyramid", text_levels=True, max_rois=rois,
                                                    roi_dim=12 if rois else 0)
    g = torch.Generator().manual_seed(1)
    batch = {"images": torch.randn(5, 3, 64, 64, generator=g), "images_1": torch.randn(5, 3, 64, 64, generator=g),
             "text": tokenize([f"a photo of the digit {i}" for i in range(5)], 32),
             "text_summary": tokenize([f"digit {i}" for i in range(5)], 32),
             "text_tags": tokenize([f"digit, {i}" for i in range(5)], 32),
             "rois": torch.randn(5, 4, 12, generator=g), "roi_mask": torch.ones(5, 4, dtype=torch.bool)}
    total, parts = module(batch)
    with torch.no_grad():
        images = {"global": model.encode_image(batch["images"], normalize=True),
                  "local": model.encode_image(batch["images_1"], normalize=True)}
        if rois:
            images["roi"] = F.normalize(model.visual.encode_rois(batch["rois"], batch["roi_mask"]) @ model.visual.proj, dim=-1)
        texts = {"summary": model.encode_text(batch["text_summary"], normalize=True),
                 "caption": model.encode_text(batch["text"], normalize=True),
                 "tags": model.encode_text(batch["text_tags"], normalize=True)}
        peers = {("global", "summary"), ("local", "caption"), ("roi", "tags")}
        scale = model.logit_scale.exp()
        losses = {(i, t): softened_contrastive_loss(images[i], texts[t], scale, 0.2) for i in images for t in texts}
        peer = [v for k, v in losses.items() if k in peers]
        cross = [v for k, v in losses.items() if k not in peers]
    assert len(peer) == (3 if rois else 2) and len(cross) == (6 if rois else 4)
    torch.testing.assert_close(parts["loss_pyramid_peer"].detach(), sum(peer) / len(peer))
    torch.testing.assert_close(parts["loss_pyramid_cross"].detach(), sum(cross) / len(cross))
    torch.testing.assert_close(total.detach(), sum(peer) / len(peer) + 0.5 * sum(cross) / len(cross))


@pytest.mark.parametrize("name", ["clip-tiny", "msclip-tiny", "msclip-s-tiny"])
def test_pyramid_and_mixup_compose_with_other_objectives_on_every_variant(name):
    """clip + pyramid (with regions) + mixup + filip on one model: the total is the
    weighted sum of each term scored alone (its own objective, on its own encoding of the
    batch) and every parameter, shared ones included, gets a gradient."""
    torch.manual_seed(0)
    cfg = ObjectiveConfig(weights={"clip": 1.0, "pyramid": 0.5, "mixup": 0.5, "filip": 0.2},
                          pyramid=PyramidConfig(rois=3, roi_dim=12), filip=FilipConfig(dim=16, top_k=4))
    model = build_model(objective_arch(build_model(name).arch, cfg))
    module = TrainModule(model, ComposedObjective(cfg, model.arch))
    objective = module.objective
    g = torch.Generator().manual_seed(2)
    size = model.arch.image_size
    batch = {"images": torch.randn(6, 3, size, size, generator=g), "images_1": torch.randn(6, 3, size, size, generator=g),
             "text": tokenize([f"a photo of the digit {i}" for i in range(6)], 32),
             "text_summary": tokenize([f"digit {i}" for i in range(6)], 32),
             "text_tags": tokenize([f"digit, {i}" for i in range(6)], 32),
             "rois": torch.randn(6, 3, 12, generator=g), "roi_mask": torch.ones(6, 3, dtype=torch.bool)}
    batch = objective.prepare(batch)
    total, parts = module(batch)

    def alone(name):  # the same term module, in an objective of its own
        single = ComposedObjective(dataclasses.replace(cfg, weights={name: 1.0}), model.arch)
        single.terms[name] = objective.terms[name]
        with torch.no_grad():
            return single(single.encode(model, batch), batch)[0]

    torch.testing.assert_close(total.detach(), alone("clip") + 0.5 * alone("pyramid") + 0.5 * alone("mixup")
                               + 0.2 * alone("filip"))
    total.backward()
    assert_every_parameter_learns(module)


def test_debiased_stream_resumes_exactly(demo_data):
    """A stream restored from the position saved after step k gives the straight run's
    batches from step k + 1 on: the same sources and the same samples."""
    cfg = DataConfig(train_shards=f"{demo_data}/shards/digits::{demo_data}/shards/photos", workers=1,
                     shuffle_buffer=20, sampling="debiased")

    def stream():
        return DebiasedStream(cfg, batch_size=8, image=ImageSpec(32, "clip"), context_length=16, seed=3)
    straight = []
    for batch in stream():
        straight.append((batch["source"], batch["keys"]))
        if len(straight) == 18:
            break
    first = stream()
    for i, _ in enumerate(first):
        if i + 1 == 9:
            saved = first.state_dict()
            break
    resumed = stream()
    resumed.load_state_dict(saved)
    after = []
    for batch in resumed:
        after.append((batch["source"], batch["keys"]))
        if len(after) == 9:
            break
    assert after == straight[9:]


def test_debiased_stream_saved_on_two_ranks_resumes_on_one(demo_data):
    """Each source's position is per virtual reader: two ranks' positions, joined, continue
    on one process with the straight two-rank run's sources and samples."""
    cfg = DataConfig(train_shards=f"{demo_data}/shards/digits::{demo_data}/shards/photos", workers=1,
                     shuffle_buffer=20, sampling="debiased", readers=4)

    def steps(world, count, states=None):
        """Per step: (source, the global batch's keys) over `world` ranks; every rank's position after."""
        per_rank, positions = [], []
        for rank in range(world):
            s = DebiasedStream(cfg, batch_size=8 // world, image=ImageSpec(32, "clip"), context_length=16, seed=3,
                               rank=rank, world=world)
            if states:
                s.load_state_dict({"from_ranks": states})
            # range first: zip stops before it takes a batch more from the stream
            per_rank.append([(b["source"], set(b["keys"])) for _, b in zip(range(count), s)])
            positions.append(s.state_dict())
        assert all(r[i][0] == per_rank[0][i][0] for r in per_rank for i in range(count))  # one source per step
        return [(per_rank[0][i][0], set().union(*(r[i][1] for r in per_rank))) for i in range(count)], positions
    straight, _ = steps(2, 12)
    _, saved = steps(2, 5)
    resumed, _ = steps(1, 7, saved)
    assert resumed == straight[5:] and {source for source, _ in straight} == {0, 1}


# ---- ZeroVL's caption and image augmentation -------------------------------------------------

def process_caption_on_ids(ids: list[int], draws: list[float], random_ids: list[int]) -> list[int]:
    """zerovl/datasets/clip/utils.py::process_caption's loop, token by token, on ids (with
    the draws given): prob < 0.2 selects; prob / 0.2 < 0.5 masks, < 0.6 takes a random
    token, else the token is appended and then deleted."""
    from pipeline.tokenizer import MASK_ID
    output, deleted = [], []
    for token, prob, random_id in zip(ids, draws, random_ids):
        if prob < 0.20:
            prob /= 0.20
            if prob < 0.5:
                output.append(MASK_ID)
            elif prob < 0.6:
                output.append(random_id)
            else:
                output.append(token)
                deleted.append(len(output) - 1)
        else:
            output.append(token)
    return [t for i, t in enumerate(output) if i not in deleted]


def test_zerovl_caption_augmentation_follows_the_reference_loop_token_by_token():
    from pipeline.data.caption_augment import zerovl_augment
    from pipeline.tokenizer import EOT_ID, MASK_ID, SOT_ID
    captions = [" ".join(f"word{(i * 7 + j) % 50}" for j in range(3 + i % 9)) for i in range(400)]
    text = tokenize(captions, 24)
    out = zerovl_augment(text, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)  # the same draws, in the same order
    draws, random_ids = torch.rand(text.shape, generator=g), torch.randint(0, SOT_ID, text.shape, generator=g)
    counts = {"masked": 0, "random": 0, "deleted": 0, "tokens": 0}
    for row in range(len(captions)):
        eot = text[row].tolist().index(EOT_ID)
        inner = process_caption_on_ids(text[row, 1:eot].tolist(), draws[row, 1:eot].tolist(),
                                       random_ids[row, 1:eot].tolist())
        expected = [SOT_ID, *inner, EOT_ID]
        assert out[row].tolist() == expected + [0] * (text.shape[1] - len(expected)), row
        selected = draws[row, 1:eot] < 0.2
        action = draws[row, 1:eot] / 0.2
        counts["masked"] += int((selected & (action < 0.5)).sum())
        counts["random"] += int((selected & (action >= 0.5) & (action < 0.6)).sum())
        counts["deleted"] += eot + 1 - len(expected)
        counts["tokens"] += eot - 1
    # the rule's rates: 10% masked, 2% random, 8% deleted of the caption's tokens
    n = counts["tokens"]
    assert abs(counts["masked"] / n - 0.10) < 0.02 and abs(counts["random"] / n - 0.02) < 0.01
    assert abs(counts["deleted"] / n - 0.08) < 0.02
    assert int((out == MASK_ID).sum()) == counts["masked"]


def test_zerovl_recipe_options_reach_the_loader(demo_data):
    """objective.view_augment / caption_augment = zerovl: the loader crops 60-100% and
    applies ImageNet AutoAugment, and augments the captions (the mask token joins the
    vocabulary), for a composed objective and for plain CLIP alike."""
    from torchvision import transforms as T
    from pipeline.tokenizer import MASK_ID
    from pipeline.data.samples import BatchMaker
    cfg = DataConfig(train_shards=str(demo_data / "shards" / "photos"), workers=0, shuffle_buffer=0)
    for weights in ({"mixup": 1.0}, {"clip": 1.0}):
        objective_cfg = ObjectiveConfig(weights=weights, view_augment="zerovl", caption_augment="zerovl")
        model = build_model(objective_arch(build_model("clip-tiny").arch, objective_cfg))
        assert model.arch.vocab_size == MASK_ID + 1
        objective = ComposedObjective(objective_cfg, model.arch)
        stream = DataStream(cfg, objective.recipe(), batch_size=32, image=ImageSpec(32, "clip"), context_length=16)
        crop, autoaugment = BatchMaker(stream.base).view_transforms[0].transforms[:2]
        assert isinstance(crop, T.RandomResizedCrop) and crop.scale == (0.6, 1.0)
        assert isinstance(autoaugment, T.AutoAugment) and autoaugment.policy == T.AutoAugmentPolicy.IMAGENET
        assert (next(iter(stream))["text"] == MASK_ID).any()
