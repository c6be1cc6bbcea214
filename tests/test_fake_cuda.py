"""The fake-device tier: GPU-only placement bugs caught on a CPU machine.

Every tiny model family x every objective recipe x the plain and the exact-accumulation
paths x fp32/bf16 runs `train_step` as the trainer runs it: the batch as the loader
yields it (on the host, uint8 pixels), the model and its objective heads on a device that
is not the host. A tensor left on the host meets a device tensor and PyTorch raises
FakeTensorDeviceMismatchError ("cuda") or a device RuntimeError ("meta").

* "cuda": PyTorch's FakeTensorMode: tensors on device "cuda" with shapes and no values,
  no GPU needed. The forward and the objective run; the backward cannot, because the
  autograd engine needs a real CUDA context (pytorch/pytorch#92627).
* "meta": the same FakeTensorMode with the model on the meta device, where the backward
  runs too, so gradients and the exact-accumulation pass 2 are checked against the host.

DeepSpeed cannot initialize on tensors without values (flat buffers, broadcasts), so a
small stand-in gives `train_step` what it uses of the engine; everything else is the
trainer's code. The check every rank must agree on (`nonfinite`) reads a value, so the
tier passes a stand-in for it too.
"""
from __future__ import annotations

import dataclasses
import functools
import types

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from pipeline.config import DataConfig, FilipConfig, NearestNeighbourConfig, ObjectiveConfig, SlipConfig
from pipeline.data.loader import DataStream
from pipeline.data.recipe import ImageSpec
from pipeline.train.engine import train_step
from pipeline.model import build_model
from pipeline.model.compile import compile_regions
from pipeline.model.configs import MODEL_CONFIGS
from pipeline.objectives import ComposedObjective, TrainModule, objective_arch
from pipeline.pixels import PIXEL_KEYS

SMALL = dict(slip=SlipConfig(mlp_dim=32, out_dim=16), filip=FilipConfig(dim=16, top_k=4),
             nn=NearestNeighbourConfig(queue_size=64))
DECLIP = dict(weights={"clip": 0.4, "nn": 0.2, "simsiam": 0.2, "mlm": 0.2}, image_views=2, view_augment="moco",
              text_eda=True, logit_scale_min=3.0)
RECIPES = {
    "clip": dict(weights={"clip": 1.0}),
    "slip": dict(weights={"clip": 1.0, "slip": 1.0}),
    "filip": dict(weights={"filip": 1.0}),
    "declip": DECLIP,
    "defilip": {**DECLIP, "weights": {**DECLIP["weights"], "filip": 0.2}},
    "pyramidclip": dict(weights={"pyramid": 1.0}),
    "mixup": dict(weights={"mixup": 1.0}),
    "clip+filip+mixup": dict(weights={"clip": 1.0, "filip": 0.5, "mixup": 0.5}),
}
MODELS = [name for name in MODEL_CONFIGS if name.endswith("-tiny")]
MICRO = 4


class DeviceEngine:
    """What train_step uses of a DeepSpeed engine: `module`, `device`, the call,
    `backward`, `step`, and the learning rates of `optimizer.param_groups` (the optimizer
    is DeepSpeed's and has nothing to place)."""

    def __init__(self, module: nn.Module, device: torch.device, backward: bool):
        self.module, self.device, self.run_backward = module, device, backward
        self.optimizer = types.SimpleNamespace(param_groups=[{"base_lr": 1e-3, "lr": 0.0}])

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss, scale_wrt_gas: bool = True):
        if self.run_backward:
            loss.backward()

    def step(self):
        pass


def never_nonfinite(loss: torch.Tensor) -> bool:
    return False


def fake_mode() -> FakeTensorMode:
    """A shape environment lets data-dependent shapes through (MLM's masked positions).
    Real tensors made inside the mode (normalization constants, the tokenizer's ids) are
    taken in as fake ones on their own device, so a host tensor still meets the device."""
    return FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)


def to_fake_device(model: nn.Module, mode: FakeTensorMode, device: str) -> nn.Module:
    """Every parameter and buffer replaced, in place, by a fake tensor on `device`
    (shared modules are one object, so sharing survives)."""
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is None:
                    continue
                fake = mode.from_tensor(tensor.detach(), static_shapes=True)
                with mode:
                    moved = fake.to(device)
                table[name] = nn.Parameter(moved, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else moved
    return model


def fake_host_batch(batch: dict, mode: FakeTensorMode) -> dict:
    """The loader's batch as fake host tensors (the keys list stays as it is)."""
    return {k: mode.from_tensor(v, static_shapes=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@functools.lru_cache(maxsize=None)
def loader_batch(shards: str, recipe: str, model_name: str, accum: int, token_drop: float = 0.0) -> dict:
    """One real batch from the demo shards, as the trainer's loader yields it for this recipe
    (with token dropping's kept positions at token_drop > 0)."""
    module, objective = build(model_name, recipe, torch.float32)
    model = module.encoder
    batch_recipe = dataclasses.replace(objective.recipe(), token_drop=token_drop,
                                       image_tokens=model.arch.grid_size ** 2)
    stream = DataStream(DataConfig(train_shards=shards, workers=0, shuffle_buffer=0, readers=1), batch_recipe,
                        batch_size=MICRO * accum, image=ImageSpec(model.arch.image_size, model.arch.normalization),
                        context_length=model.arch.context_length, uint8=True)
    return next(iter(stream))


def build(model_name: str, recipe: str, dtype: torch.dtype):
    cfg = ObjectiveConfig(**RECIPES[recipe], **SMALL)
    torch.manual_seed(0)
    model = build_model(objective_arch(build_model(model_name).arch, cfg))
    module = TrainModule(model, ComposedObjective(cfg, model.arch)).to(dtype)
    if "mixup" in module.objective.terms:
        mixup = module.objective.terms["mixup"]
        mixup._draws = int(mixup.draws)  # the once-per-run host read of the draw counter
    return module, module.objective


def run_step(model_name, recipe, dtype, device, accum, shards, mutate=None, token_drop=0.0, compiled=False):
    module, objective = build(model_name, recipe, dtype)
    host_batch = loader_batch(shards, recipe, model_name, accum, token_drop)
    assert ("token_keep" in host_batch) == bool(token_drop)
    assert host_batch["images"].dtype == torch.uint8 and host_batch["images"].device.type == "cpu"
    mode = fake_mode()
    to_fake_device(module.train(), mode, device)
    if compiled:  # model.compile's regions, traced by dynamo and AOT autograd on the fake tensors
        compile_regions(module.encoder, fullgraph=True, backend="aot_eager")
    batch = fake_host_batch(host_batch, mode)
    if mutate:
        mutate(objective)
    engine = DeviceEngine(module, torch.device(device), backward=device == "meta")
    with mode:  # the whole step: learning rates, forward, objective, backward, the logit-scale clamps
        out = train_step(engine, batch, objective, accum, 1.0, module.logit_scale_bounds(),
                         nonfinite=never_nonfinite)
    assert out["loss"].device.type == device
    model = module
    if device == "meta" and recipe != "filip":
        # FILIP alone trains no pooled projection or logit scale (issue 14 item 3, open)
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, missing
        assert {p.grad.device.type for p in model.parameters() if p.grad is not None} == {"meta"}
    return out


@pytest.fixture(scope="module")
def photos(demo_data) -> str:
    return str(demo_data / "shards" / "photos")


# Every tiny family x every recipe x fp32/bf16 on fake CUDA (forward and objective) and on
# meta (with the backward). Fake tensors keep static shapes (from_tensor(static_shapes=True)):
# symbolic shapes for every input made each case ~8 s of shape reasoning instead of ~0.5 s;
# only data-dependent sizes (MLM's selected positions) stay symbolic.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GRID = [(d, m, r, t) for d in ("cuda", "meta") for m in MODELS for r in RECIPES for t in DTYPES]


@pytest.mark.parametrize("device,model_name,recipe,dtype", GRID, ids=[f"{d}-{m}-{r}-{t}" for d, m, r, t in GRID])
def test_train_step_keeps_every_tensor_on_the_model_device(device, model_name, recipe, dtype, photos):
    run_step(model_name, recipe, DTYPES[dtype], device, 1, photos)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model_name", MODELS)
def test_exact_accumulation_keeps_every_tensor_on_the_model_device(model_name, dtype, photos):
    """On meta only: the accumulation's loss on the cached features runs its own backward
    between the two passes, which fake CUDA cannot run."""
    run_step(model_name, "clip", dtype, "meta", 2, photos)


@pytest.mark.parametrize("device,accum", [("cuda", 1), ("meta", 1), ("meta", 2)])
@pytest.mark.parametrize("model_name", MODELS)
def test_token_dropping_keeps_every_tensor_on_the_model_device(model_name, device, accum, photos):
    """model.token_drop: the loader's kept positions (host int64) index the device tokens,
    and the MS-CLIP-S adapters scatter and gather with them."""
    run_step(model_name, "clip+filip+mixup" if accum == 1 else "clip", torch.bfloat16, device, accum, photos,
             token_drop=0.5)


def test_compiled_regions_keep_every_tensor_on_the_model_device(photos):
    """model.compile (pipeline/model/compile.py): the regions traced by dynamo and AOT
    autograd (backend aot_eager) on meta, forward and backward, with token dropping, MS-CLIP-S's
    branch and adapters, and exact accumulation (its first pass runs the regions without
    grad, its second with). A host tensor made inside a compiled region meets the device
    there (seen with one planted into the adapters). On fake "cuda" the trace needs a real
    CUDA context (device properties), so the compiled tier is meta only; bench/gpu.sh runs
    the CUDA kernels (tests/test_gpu.py)."""
    run_step("msclip-s-tiny", "clip", torch.bfloat16, "meta", 2, photos, token_drop=0.5, compiled=True)


TERM_RECIPE = {"clip": "slip", "slip": "slip", "filip": "filip", "mlm": "declip", "simsiam": "declip", "nn": "declip",
               "pyramid": "pyramidclip", "mixup": "mixup"}


@pytest.mark.parametrize("term", TERM_RECIPE)
def test_a_host_tensor_in_any_term_fails_the_tier(term, photos):
    """The tier's own check: a term that reads one batch tensor back on the host raises."""
    recipe = TERM_RECIPE[term]

    def leak(objective):
        module = objective.terms[term]
        forward = module.forward

        def on_host(out, batch):
            loss, parts = forward(out, batch)
            # a batch tensor back on the host (not 0-dim: those mix with device tensors legally)
            host = batch["text"].cpu().float().mean(dim=1)  # (B,)
            return (loss + host).mean(), parts

        module.forward = on_host

    with pytest.raises(Exception, match="(?i)device"):
        run_step("msclip-s-tiny", recipe, torch.float32, "cuda", 1, photos, mutate=leak)


def test_pixels_on_device_and_the_periodic_evaluator_stay_on_the_device(demo_data):
    """uint8 pixels are normalized on the device; the in-training evaluator's model copy
    and its feature extraction run on the trainer's device and hand back host features."""
    from eval.data import image_loader, read_classification
    from eval.during_training import eval_copy
    from eval.features import image_features, model_transform, zeroshot_weights
    from pipeline.pixels import pixels_on_device
    mode = fake_mode()
    host = fake_host_batch(loader_batch(str(demo_data / "shards" / "photos"), "clip", "msclip-s-tiny", 1), mode)
    with mode:
        moved = pixels_on_device(host, torch.device("cuda"))
    pixels = [k for k in moved if k.startswith(PIXEL_KEYS)]
    assert pixels and all(moved[k].device.type == "cuda" and moved[k].dtype == torch.float32 for k in pixels)

    # The eval reader and the tokenizer make real host tensors: the mode takes them in as
    # fake host tensors, and any that is not moved to the device meets a device tensor.
    # (The reader's batches are read first: decoding needs values.)
    mode = fake_mode()
    model = build_model("msclip-s-tiny")
    trained = to_fake_device(TrainModule(model, ComposedObjective(ObjectiveConfig(), model.arch)).to(torch.bfloat16),
                             mode, "cuda")
    with mode:
        copy = eval_copy(trained)  # as the trainer's rank 0 makes it
    assert {(p.device.type, p.dtype) for p in copy.parameters()} == {("cuda", torch.float32)} and not copy.training
    data = read_classification(demo_data / "eval" / "digits")
    batches = list(image_loader(data.images[:8], model_transform(copy), 4, 0, data.labels[:8]))
    with mode:  # the device half of eval.zeroshot.evaluate, as the evaluator runs it
        classifier = zeroshot_weights(copy, data.classnames, data.templates[:2], "cuda")
        feats, target = image_features(copy, batches, "cuda")
    assert classifier.device.type == feats.device.type == "cpu" and feats.shape[0] == 8 and len(target) == 8
