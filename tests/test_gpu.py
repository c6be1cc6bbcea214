"""Real-CUDA tests (`pytest -m gpu`, run by bench/gpu.sh on a lent GPU machine): they
are collected everywhere and skip cleanly where no GPU is present (CI, the developers'
machines). The fake-device tier (test_fake_cuda.py) covers placement on CPU; these cover
what only a GPU computes: the bf16 engine, FusedAdam's CUDA kernel, flash attention,
token dropping's gathers, and every objective stepping through DeepSpeed on CUDA."""
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import free_port
from test_fake_cuda import RECIPES, SMALL, loader_batch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu.sh)")]


@pytest.fixture(scope="module")
def process_group():
    """One process, NCCL: what the deepspeed launcher gives a single-GPU run."""
    import deepspeed
    from pipeline.train.engine import arch_list_deepspeed_can_parse
    arch_list_deepspeed_can_parse()  # as the trainer does before deepspeed.initialize
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    deepspeed.init_distributed(dist_backend="nccl")
    yield
    torch.distributed.destroy_process_group()


def test_bf16_autocast_loss_agrees_with_fp32():
    from pipeline.losses import contrastive_loss
    from pipeline.model import build_model
    torch.manual_seed(0)
    model = build_model("msclip-s-tiny").cuda()
    images = torch.randn(16, 3, 64, 64, device="cuda")
    text = torch.randint(1, 49405, (16, 32), device="cuda")
    text[:, -1] = 49407
    losses = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(images, text)
        losses[name] = contrastive_loss(out["image_features"].float(), out["text_features"].float(),
                                        out["logit_scale"].float())
    assert abs(losses["bf16"].item() - losses["fp32"].item()) < 2e-2 * losses["fp32"].item()


@pytest.mark.parametrize("name", ["clip-tiny", "msclip-s-tiny"])
def test_token_dropping_on_cuda_equals_the_cpu_forward(name):
    """model.token_drop's gather and scatter (MS-CLIP-S's adapters) on CUDA, against the
    same kept positions on the CPU, and the gradients there."""
    from pipeline.model import build_model
    from pipeline.model.token_drop import draw_keep
    torch.manual_seed(0)
    model = build_model(name)
    images = torch.randn(8, 3, 64, 64)
    text = torch.randint(1, 49405, (8, 32))
    text[:, -1] = 49407
    keep = torch.stack([draw_keep(16, 0.5, torch.Generator().manual_seed(i)) for i in range(8)])
    cpu = model(images, text, keep=keep)["image_features"]
    gpu = model.cuda()(images.cuda(), text.cuda(), keep=keep.cuda())["image_features"]
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-4)
    gpu.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith(("text.", "logit")))


def test_fused_adam_step_equals_torch_adamw():
    from deepspeed.ops.adam import FusedAdam
    from pipeline.train.engine import arch_list_deepspeed_can_parse
    arch_list_deepspeed_can_parse()
    torch.manual_seed(0)
    params = [torch.randn(257, 129, device="cuda", requires_grad=True) for _ in range(2)]
    twins = [p.detach().clone().requires_grad_(True) for p in params]
    fused = FusedAdam(params, lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2, adam_w_mode=True)
    plain = torch.optim.AdamW(twins, lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for group, opt in ((params, fused), (twins, plain)):
            for p, g in zip(group, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(params, twins):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attention_equals_math_attention(causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 8, 77, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    with sdpa_kernel(SDPBackend.MATH):
        math_ = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
    torch.testing.assert_close(flash.float(), math_, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_objective_steps_through_deepspeed_on_cuda(recipe, process_group, demo_data):
    """ZeRO-2, bf16 engine, FusedAdam: one step, a finite loss, the parameters moved."""
    import deepspeed
    from pipeline.config import ObjectiveConfig, OptimConfig, TrainConfig
    from pipeline.train.ds_config import fill_ds_config
    from pipeline.train.engine import param_groups, train_step
    from pipeline.model import build_model
    from pipeline.objectives import ComposedObjective, TrainModule, objective_arch
    cfg = ObjectiveConfig(**RECIPES[recipe], **SMALL)
    torch.manual_seed(0)
    model = build_model(objective_arch(build_model("msclip-s-tiny").arch, cfg))
    module = TrainModule(model, ComposedObjective(cfg, model.arch))
    optim = OptimConfig(lr=1e-3)
    ds = fill_ds_config({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}},
                        TrainConfig(global_batch_size=4, micro_batch_size=4), optim, 1)
    engine, *_ = deepspeed.initialize(model=module, model_parameters=param_groups(module, optim), config=ds)
    # the vision trunk: every objective trains it (FILIP alone leaves visual.proj, the
    # pooled projection, without a gradient: it scores token features through its own head)
    trunk = model.visual.blocks[0].attn.qkv.weight
    before = trunk.detach().float().clone()
    batch = loader_batch(str(demo_data / "shards" / "photos"), recipe, "msclip-s-tiny", 1)
    out = train_step(engine, batch, module.objective, 1, 1.0, module.logit_scale_bounds())
    assert out["skipped"] == 0 and torch.isfinite(out["loss"]).item()
    assert out["loss"].device.type == "cuda"
    assert not torch.equal(trunk.detach().float(), before)


def test_compiled_regions_on_cuda_in_bf16_agree_with_eager():
    """model.compile on the GPU (inductor's Triton kernels): MS-CLIP-S with token dropping,
    in bf16 as the engine runs it; loss and gradients within bf16's rounding of eager's."""
    import copy

    from pipeline.losses import contrastive_loss
    from pipeline.model import build_model
    from pipeline.model.compile import compile_regions
    from pipeline.model.token_drop import draw_keep
    torch.manual_seed(0)
    eager = build_model("msclip-s-tiny").cuda().bfloat16()
    compiled = copy.deepcopy(eager)
    compile_regions(compiled)
    images = torch.randn(16, 3, 64, 64, device="cuda", dtype=torch.bfloat16)
    text = torch.randint(1, 49405, (16, 32), device="cuda")
    text[:, -1] = 49407
    keep = torch.stack([draw_keep(16, 0.5, torch.Generator().manual_seed(i)) for i in range(16)]).cuda()
    losses, grads = {}, {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        out = model(images, text, keep=keep)
        losses[name] = contrastive_loss(out["image_features"].float(), out["text_features"].float(),
                                        out["logit_scale"].float())
        losses[name].backward()
        grads[name] = torch.cat([p.grad.float().flatten() for p in model.parameters()])
    assert abs(losses["compiled"].item() - losses["eager"].item()) < 1e-2 * losses["eager"].item()
    assert (grads["compiled"] - grads["eager"]).norm() < 5e-2 * grads["eager"].norm()


def test_the_micro_batch_probe_picks_the_largest_size_under_its_budget(demo_data):
    """train.micro_batch_size=auto's probe (pipeline/train/auto_batch.py) on this GPU: given a
    budget between two sizes' measured peaks, it picks the smaller; on the whole GPU it picks
    a size whose real step fits, and says so in one line."""
    from pipeline.config import ObjectiveConfig
    from pipeline.model import build_model
    from pipeline.objectives import ComposedObjective, TrainModule
    from pipeline.train.auto_batch import StepProbe, largest_fitting, micro_batch_candidates, probe_micro_batch
    torch.manual_seed(0)
    model = build_model("msclip-s-tiny")
    module = TrainModule(model, ComposedObjective(ObjectiveConfig(), model.arch))
    batch = loader_batch(str(demo_data / "shards" / "photos"), "clip", "msclip-s-tiny", 8)  # 32 samples
    device = torch.device("cuda", 0)
    candidates = micro_batch_candidates(32, exact_accumulation=True)
    unlimited = StepProbe(module, batch, torch.bfloat16, device, reserve=0, budget=2 ** 62)
    assert largest_fitting(candidates, unlimited) == 32
    for size in (8, 16):
        unlimited(size)  # each probe records its peak
    peaks = dict(unlimited.peaks)
    unlimited.close()
    assert peaks[8] < peaks[16]
    budget = (peaks[8] + peaks[16]) // 2
    assert largest_fitting(candidates, StepProbe(module, batch, torch.bfloat16, device, 0, budget)) == 8
    ds = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}
    micro, checkpointing, said = probe_micro_batch(module, batch, ds, 1, 32, True, device)
    assert micro == 32 and not checkpointing and said.startswith("train.micro_batch_size=auto: 32 ")


def test_the_patchwise_depthwise_convolution_on_cuda_is_cudnns():
    """The adapters' kernel == stride depthwise convolution as a patch sum, on CUDA in
    bf16, against cuDNN's convolution: output and gradients to bf16 rounding."""
    from pipeline.model.vision import PatchDepthwiseConv2d
    torch.manual_seed(0)
    conv = PatchDepthwiseConv2d(48, 48, 16, 16, padding=0, groups=48, bias=False).cuda().bfloat16()
    x = torch.randn(16, 48, 112, 112, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ours, reference = conv(x), F.conv2d(x, conv.weight, None, 16, 0, 1, 48)
    grad = torch.randn_like(reference)
    pairs = [(ours, reference), *zip(torch.autograd.grad(ours, (x, conv.weight), grad),
                                     torch.autograd.grad(reference, (x, conv.weight), grad))]
    for a, b in pairs:
        assert (a.float() - b.float()).norm() <= 1e-2 * b.float().norm()
