"""Every fast path gives the plain path's results within tolerance: JPEG draft decoding,
uint8 batches normalized by the trainer (exactly), torch.compile, channels-last images,
SDPA attention, the fused QKV projection (against PyTorch's own multi-head attention),
fused AdamW (torch's and DeepSpeed's), bf16 autocast. What each
buys is measured in bench/bench_fast_paths.py and bench/bench_train.py, not here."""
import copy
import dataclasses
import io
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.config import DataConfig, ObjectiveConfig
from pipeline.data.decode import decode_sample
from pipeline.data.loader import DataStream
from pipeline.data.samples import BatchMaker
from pipeline.data.recipe import BatchRecipe, ImageSpec, StreamSpec
from pipeline.data.remote import read_policy
from pipeline.data.shards import ShardSet
from pipeline.data.transforms import eval_transform
from pipeline.train.engine import model_batch
from pipeline.losses import contrastive_loss
from pipeline.model import build_model
from pipeline.model.configs import NORMALIZATION
from pipeline.model.layers import Attention
from pipeline.objectives import ComposedObjective, TrainModule
from pipeline.pixels import PIXEL_KEYS, pixels_on_device
from pipeline.tokenizer import EOT_ID, SOT_ID


def photo_jpeg(size=(1280, 854)) -> bytes:
    from sklearn.datasets import load_sample_image
    buf = io.BytesIO()
    Image.fromarray(load_sample_image("china.jpg")).resize(size).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_jpeg_draft_decodes_smaller_and_the_crop_stays_the_same():
    sample = {"jpg": photo_jpeg(), "txt": b"a temple"}
    full, _ = decode_sample(sample, 0)
    draft, _ = decode_sample(sample, 224)
    assert full.size == (1280, 854) and min(draft.size) >= 224 and draft.size[0] < 1280  # reduced, never below need
    transform = eval_transform(224, "clip")
    a, b = transform(full), transform(draft)
    # normalized units (std ~ 1): resampling differences only
    assert (a - b).abs().mean() < 0.03, (a - b).abs().mean()
    small = {"jpg": photo_jpeg((300, 200)), "txt": b"x"}  # under 2x the need: decoded as is
    assert decode_sample(small, 224)[0].tobytes() == decode_sample(small, 0)[0].tobytes()


@pytest.mark.parametrize("scale", [(0.9, 1.0), (0.08, 1.0)])
def test_the_train_crop_resized_on_the_tensor_is_pillows_to_one_level(scale):
    """train_transform resizes its random crop on the uint8 tensor (torchvision v2's SIMD
    bicubic): from the same generator state it draws the same crop as open_clip's
    RandomResizedCrop on the PIL image, and its pixels are Pillow's bicubic to one level
    but for a few in ten thousand (measured: at most 0.02% of pixels off by 2-5 levels where
    an upscaled crop meets the image's edge; mean difference 0.002-0.15 levels)."""
    from torchvision import transforms as T

    from pipeline.data.transforms import train_transform
    image = Image.open(io.BytesIO(photo_jpeg((320, 256)))).convert("RGB")
    ours, pillow = train_transform(224, None, scale), T.Compose([
        T.RandomResizedCrop(224, scale=scale, interpolation=T.InterpolationMode.BICUBIC), T.PILToTensor()])
    for seed in range(5):
        torch.manual_seed(seed)
        a = ours(image)
        torch.manual_seed(seed)
        b = pillow(image)
        assert a.dtype == torch.uint8 and a.shape == b.shape == (3, 224, 224)
        difference = (a.int() - b.int()).abs()
        assert (difference > 1).float().mean() < 1e-3 and difference.float().mean() < 0.2
    floats = train_transform(224, "clip", scale)  # the worker-normalized path: ToTensor + Normalize's arithmetic
    torch.manual_seed(0)
    expected = T.Normalize(*NORMALIZATION["clip"])(ours(image).float() / 255)
    torch.manual_seed(0)
    assert torch.equal(floats(image), expected)


def test_draft_size_keeps_full_resolution_for_the_smallest_crop():
    data = DataConfig(train_shards="x.tar", rrc_scale=(0.9, 1.0))
    spec = StreamSpec(data=data, shards=ShardSet(["x.tar"], [1]), read=read_policy(data), recipe=BatchRecipe(),
                      image=ImageSpec(224, "clip"), context_length=77, batch_size=1)
    assert BatchMaker(spec).draft_size == math.ceil(224 / math.sqrt(0.9))
    slip = dataclasses.replace(spec, recipe=BatchRecipe(ssl_views=2))  # SimCLR crops down to 8% of the area
    assert BatchMaker(slip).draft_size == math.ceil(224 / math.sqrt(0.08))
    off = dataclasses.replace(spec, data=dataclasses.replace(data, jpeg_draft=False))
    assert BatchMaker(off).draft_size == 0


@pytest.mark.parametrize("views", [dict(views=1), dict(views=2, view_augment="moco", ssl_views=2)],
                         ids=["clip", "moco-views+slip-views"])
def test_uint8_batches_normalized_on_the_device_equal_the_float_batches(demo_data, views):
    """data.uint8_batches: the same stream position gives the same samples, and every image
    tensor (views, SLIP views) normalized by the trainer's `pixels_on_device` equals the
    worker-normalized float batch bit for bit; nothing else in the batch changes."""
    cfg = DataConfig(train_shards=f"{demo_data}/shards/photos", workers=1, shuffle_buffer=20)

    def first_batches(uint8):
        s = DataStream(cfg, BatchRecipe(**views), batch_size=8, image=ImageSpec(48, "imagenet"), context_length=16,
                       seed=3, uint8=uint8)
        return [b for b, _ in zip(s, range(2))]

    for packed, plain in zip(first_batches(True), first_batches(False)):
        pixel_keys = [k for k in plain if k.startswith(PIXEL_KEYS)]
        assert len(pixel_keys) == views["views"] + views.get("ssl_views", 0)
        assert all(packed[k].dtype == torch.uint8 and packed[k].shape == plain[k].shape for k in pixel_keys)
        on_device = pixels_on_device(packed, torch.device("cpu"))
        assert on_device.keys() == plain.keys() and on_device["keys"] == plain["keys"]
        for key in pixel_keys:
            assert on_device[key].dtype == torch.float32
            assert torch.equal(on_device[key], plain[key]), key
        assert torch.equal(on_device["text"], plain["text"])
    float_batch = first_batches(False)[0]
    assert pixels_on_device(float_batch, torch.device("cpu")) is float_batch  # a float batch passes through


@pytest.mark.slow
def test_compiled_regions_give_the_eager_loss_and_gradients_and_the_blocks_compile_once():
    """model.compile: every transformer block, the conv stem, each branch stage and adapter
    of MS-CLIP-S compiled in place (pipeline/model/compile.py, inductor on CPU), with the
    trainer's hard cases on: token dropping (the adapters' scatter and gather on the kept
    positions) and activation checkpointing (the compiled block recomputed in backward).
    fullgraph: a graph break in any region fails. The loss, features and every parameter's
    gradient equal eager's within fp32 reordering tolerance, and the blocks of a tower share
    one compiled graph (parameters are graph inputs): fewer graphs than regions. ~1 min."""
    from torch._dynamo.utils import counters

    from pipeline.model.compile import compile_regions
    from pipeline.model.token_drop import draw_keep
    torch.manual_seed(0)
    eager = build_model("msclip-s-tiny")
    compiled = copy.deepcopy(eager)
    for model in (eager, compiled):
        model.set_grad_checkpointing(True)
    names = compile_regions(compiled, fullgraph=True)
    size, grid = eager.arch.image_size, eager.arch.grid_size
    images = torch.randn(4, 3, size, size)
    text = torch.randint(1, SOT_ID - 1, (4, eager.arch.context_length))
    text[:, 20:] = 0
    text[:, 19] = EOT_ID
    generator = torch.Generator().manual_seed(0)
    keep = torch.stack([draw_keep(grid ** 2, 0.5, generator) for _ in range(4)])

    def step(model):
        out = model(images, text, keep=keep)
        loss = contrastive_loss(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        return loss.detach(), out["image_features"].detach(), {n: p.grad for n, p in model.named_parameters()}

    (loss_e, features_e, grads_e) = step(eager)
    counters.clear()
    loss_c, features_c, grads_c = step(compiled)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(features_c, features_e, rtol=1e-4, atol=1e-5)
    assert grads_c.keys() == grads_e.keys() and all(g is not None for g in grads_c.values())
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-3, atol=1e-5, msg=name)
    blocks = [n for n in names if ".blocks." in n]
    assert len(blocks) == len(compiled.visual.blocks) + len(compiled.text.blocks) and "visual.stem" in names
    # one graph per tower's blocks, one for the stem, one per branch stage and adapter
    others = len(names) - len(blocks)
    assert counters["stats"]["unique_graphs"] <= 2 + others < len(names)


def test_channels_last_images_give_the_same_features():
    torch.manual_seed(0)
    model = build_model("msclip-s-tiny").use_channels_last().eval()
    batch = {"images": torch.randn(3, 3, 64, 64), "text": torch.randint(1, SOT_ID - 1, (3, 32))}
    batch["text"][:, -1] = EOT_ID
    module = TrainModule(model, ComposedObjective(ObjectiveConfig(), model.arch))
    on_device = model_batch(batch, module)  # what the step hands the engine
    images, text = on_device["images"], on_device["text"]
    assert images.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        nhwc = model(images, text)["image_features"]
        nchw = model(batch["images"], text)["image_features"]
    torch.testing.assert_close(nhwc, nchw, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_fused_qkv_sdpa_attention_equals_pytorch_multihead_attention(causal):
    """Our attention (one fused QKV projection, SDPA) against torch.nn.MultiheadAttention
    with the same weights (its in_proj is the same fused layout), and against the explicit
    softmax(QK^T / sqrt(d)) V with a key mask."""
    torch.manual_seed(0)
    ours = Attention(32, 4)
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.qkv.weight)
        ref.in_proj_bias.copy_(ours.qkv.bias)
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    x = torch.randn(2, 7, 32)
    mask = torch.triu(torch.full((7, 7), float("-inf")), 1) if causal else None
    expected, _ = ref(x, x, x, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(ours(x, causal), expected, rtol=1e-5, atol=1e-5)

    keys = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    q, k, v = ours.qkv(x).view(2, 7, 3, 4, 8).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-2, -1) / math.sqrt(8)
    scores = scores.masked_fill(~keys[:, None, None, :], float("-inf"))
    if causal:
        scores = scores + mask
    explicit = ours.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 32))
    torch.testing.assert_close(ours(x, causal, keys), explicit, rtol=1e-5, atol=1e-5)


def adamw_steps(make_optimizer, steps=3):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(50, 30)), torch.nn.Parameter(torch.randn(30))]
    optimizer = make_optimizer(params)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()
    return [p.detach() for p in params]


def test_fused_adamw_steps_equal_the_plain_implementation():
    kwargs = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    plain = adamw_steps(lambda ps: torch.optim.AdamW(ps, foreach=False, **kwargs))
    fused = adamw_steps(lambda ps: torch.optim.AdamW(ps, fused=True, **kwargs))
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b)
    from deepspeed.ops.adam import FusedAdam  # the CPU op ds_configs/cpu_bf16.json uses
    deepspeed = adamw_steps(lambda ps: FusedAdam(ps, adam_w_mode=True, **kwargs))
    for a, b in zip(deepspeed, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_features_agree_with_fp32():
    torch.manual_seed(0)
    model = build_model("clip-tiny").eval()
    images, text = torch.randn(4, 3, 64, 64), torch.randint(1, SOT_ID - 1, (4, 32))
    text[:, -1] = EOT_ID
    with torch.no_grad():
        fp32 = model(images, text)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(images, text)
    for key in ("image_features", "text_features"):
        cosine = F.cosine_similarity(fp32[key], bf16[key].float(), dim=-1)
        assert cosine.min() > 0.99, (key, cosine)
