"""DeepSpeed glue without the launcher: batch arithmetic, optimizer groups, schedule,
exact large-batch accumulation against one big batch, the non-finite policy, the
logit-scale clamp, checkpoints and weights-only loading."""
import json
import math
import os
import pickle

import pytest
import torch
import torch.multiprocessing as mp

from pipeline.config import ConfigError, OptimConfig, TrainConfig
from pipeline.train.ds_config import accumulation_steps, check_against_deepspeed, fill_ds_config, read_ds_config
from pipeline.train.engine import lr_factor, param_groups
from pipeline.losses import contrastive_loss
from pipeline.model import MAX_LOGIT_SCALE, build_model
from pipeline.model.token_drop import draw_keep
from pipeline.tokenizer import tokenize


# ---- config arithmetic -------------------------------------------------------------------

@pytest.mark.parametrize("global_,micro,world,accum", [(64, 32, 2, 1), (256, 16, 4, 4), (32, 32, 1, 1), (96, 8, 3, 4)])
def test_batch_arithmetic_fills_deepspeed_config(global_, micro, world, accum):
    ds = fill_ds_config({"zero_optimization": {"stage": 2}}, TrainConfig(global_batch_size=global_, micro_batch_size=micro),
                        OptimConfig(lr=3e-4, grad_clip=0.5), world)
    assert ds["train_batch_size"] == global_ == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world
    assert ds["gradient_accumulation_steps"] == accum
    assert ds["gradient_clipping"] == 0.5 and ds["optimizer"]["params"]["lr"] == 3e-4


def test_batch_arithmetic_that_does_not_divide_names_the_keys():
    with pytest.raises(ConfigError, match=r"train.global_batch_size: 64 is not a multiple of train.micro_batch_size 16 x world size 3"):
        accumulation_steps(TrainConfig(global_batch_size=64, micro_batch_size=16), 3)


def test_deepspeed_json_may_not_hold_run_config_keys(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 64}))
    with pytest.raises(ConfigError, match="'train_batch_size' belongs in the run config \\(train.global_batch_size\\)"):
        read_ds_config(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_ds_config(path)


@pytest.mark.parametrize("ds,message", [
    ({"zero_optimisation": {"stage": 3}}, "unknown DeepSpeed key 'zero_optimisation'; did you mean 'zero_optimization'?"),
    ({"zero_optimization": {"stage": 7}}, "zero_optimization.stage: 7 is not a ZeRO stage (0, 1, 2 or 3)"),
    ({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_sise": 5}},
     "zero_optimization.stage3_prefetch_bucket_sise: Extra inputs are not permitted; "
     "did you mean 'stage3_prefetch_bucket_size'?"),
    ({"optimizer": {"type": "AdamWW"}}, "optimizer.type: 'AdamWW' is neither a DeepSpeed optimizer"),
])
def test_deepspeed_keys_it_would_ignore_are_errors(tmp_path, ds, message):
    """Issue 22 case 5: DeepSpeed ignores keys it does not know, so a misspelled section
    ran ZeRO-2 (or none) instead of the intended stage 3, without a word."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    with pytest.raises(ConfigError) as err:
        check_against_deepspeed(read_ds_config(path), path)  # the fast checks, then DeepSpeed's own models
    assert str(err.value).startswith(f"{path}: {message}") and "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["AdamW", "adam", "Lamb", "SGD", "RMSprop"])
def test_optimizers_deepspeed_or_torch_knows_pass(tmp_path, name):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": {"type": name}}))
    check_against_deepspeed(read_ds_config(path), path)


def test_every_shipped_deepspeed_config_loads_and_fills(repo_root):
    files = sorted((repo_root / "ds_configs").glob("*.json"))
    assert {f.name for f in files} >= {"zero1_bf16.json", "zero2_bf16.json", "zero3_bf16.json",
                                       "zero2_offload_bf16.json", "cpu_bf16.json", "cpu_fp32.json"}
    for f in files:
        ds = fill_ds_config(read_ds_config(f), TrainConfig(), OptimConfig(), 2)
        check_against_deepspeed(ds, f)
        assert ds["zero_optimization"]["stage"] in (1, 2, 3)


# ---- optimizer groups and schedule -------------------------------------------------------

def test_param_groups_follow_msclip():
    model = build_model("msclip-s-tiny")
    groups = param_groups(model, OptimConfig(lr=1e-3, weight_decay=0.05, shared_lr=2e-3, shared_weight_decay=0.2))
    by_name = {g["name"]: g for g in groups}
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(list(model.parameters()))  # each exactly once
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"logit_scale", "text.token_embedding.weight", "visual.positional_embedding"} <= no_decay
    assert all(n.endswith(("bias", "ln_1.weight", "ln_2.weight")) or "ln" in n or "embedding" in n or "bn" in n
               or n == "logit_scale" or model.get_parameter(n).ndim < 2 for n in no_decay)
    shared = {id(p) for p in model.shared_parameters()}
    for g in groups:
        in_shared = {id(p) in shared for p in g["params"]}
        assert len(in_shared) == 1
        if in_shared.pop():
            assert g["lr"] == 2e-3 and g["weight_decay"] in (0.0, 0.2)
        else:
            assert g["lr"] == 1e-3 and g["weight_decay"] in (0.0, 0.05)
    assert by_name["shared_decay"]["weight_decay"] == 0.2 and by_name["tower_decay"]["weight_decay"] == 0.05


def test_lr_schedule_is_warmup_then_decay():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule="cosine")
    f = [lr_factor(s, cfg, 110) for s in range(110)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(f[:10], f[1:10]))  # warmup rises
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # decay falls
    assert lr_factor(110, cfg, 110) == pytest.approx(0.1)  # ends at min_lr / lr
    assert lr_factor(60, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: the cosine's midpoint
    assert lr_factor(60, OptimConfig(lr=1e-3, warmup_steps=10, schedule="linear"), 110) == pytest.approx(0.5)
    assert lr_factor(100, OptimConfig(lr=1e-3, warmup_steps=10, schedule="constant"), 110) == 1.0


# ---- the engine in real processes ---------------------------------------------------------

GLOBAL, MICRO = 16, 4


def reference_batch():
    g = torch.Generator().manual_seed(7)
    images = torch.randn(GLOBAL, 3, 64, 64, generator=g)
    words = ["dog", "cat", "car", "tree", "seven", "house", "boat", "bird"]
    text = tokenize([f"a photo of a {words[i % 8]} number {i}" for i in range(GLOBAL)], 32)
    return images, text


def reference_keep() -> torch.Tensor:
    """Token dropping's kept positions for reference_batch (half of msclip-tiny's 16)."""
    return torch.stack([draw_keep(16, 0.5, torch.Generator().manual_seed(i)) for i in range(GLOBAL)])


def _engine_worker(rank: int, world: int, port: int, out_path: str, scenario: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    import deepspeed
    import torch.distributed as dist
    from pipeline.config import ObjectiveConfig
    from pipeline.train.engine import topology_free_grad_norm, train_step
    from pipeline.objectives import ComposedObjective, TrainModule
    torch.manual_seed(0)
    model = build_model("msclip-tiny")
    module = TrainModule(model, ComposedObjective(ObjectiveConfig(), model.arch))  # plain CLIP
    accum = GLOBAL // (MICRO * world)
    ds = fill_ds_config({"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True},
                        TrainConfig(global_batch_size=GLOBAL, micro_batch_size=MICRO),
                        OptimConfig(grad_clip=0.0), world)
    del ds["optimizer"]
    # Plain SGD with lr 1: the update is exactly the averaged gradient (Adam would hide its scale).
    # the step sets each group's lr to base_lr x the schedule's factor (1 here)
    sgd = torch.optim.SGD([{"params": list(module.parameters()), "lr": 1.0, "base_lr": 1.0}])
    engine, *_ = deepspeed.initialize(model=module, optimizer=sgd, config=ds)
    topology_free_grad_norm(engine)  # as the trainer does
    images, text = reference_batch()
    local = slice(rank * GLOBAL // world, (rank + 1) * GLOBAL // world)
    batch = {"images": images[local], "text": text[local]}
    if scenario == "token_drop":  # each sample's kept tokens: both passes must use them
        batch["token_keep"] = reference_keep()[local]
    if scenario == "nan":
        clip = module.objective.terms["clip"]
        forward = clip.forward
        clip.forward = lambda out, batch: (forward(out, batch)[0] * float("nan"), {})
    if scenario == "clamp":  # a stored scale past ln 100: the step's own clamp brings the master copy back
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param
        safe_set_full_fp32_param(model.logit_scale, torch.tensor([7.0]))
    before = {n[len("encoder."):]: p.detach().clone() for n, p in engine.module.named_parameters()}
    step = train_step(engine, batch, module.objective, accum, 1.0, module.logit_scale_bounds())
    after = {n[len("encoder."):]: p.detach().clone() for n, p in engine.module.named_parameters()}
    result = {"loss": step["loss"], "skipped": step["skipped"], "delta": {n: before[n] - after[n] for n in before},
              "grad_norm": engine.get_global_grad_norm()}
    if scenario == "clamp":
        result["clamped"] = safe_get_full_fp32_param(model.logit_scale)
    if rank == 0:
        torch.save(result, out_path)
    dist.barrier()
    dist.destroy_process_group()


def run_engine(world: int, tmp_path, scenario: str = "step") -> dict:
    from conftest import free_port
    out = str(tmp_path / f"{scenario}_{world}.pt")
    mp.spawn(_engine_worker, args=(world, free_port(), out, scenario), nprocs=world, join=True)
    return torch.load(out, weights_only=True)


def big_batch_gradient(keep: torch.Tensor | None = None):
    torch.manual_seed(0)
    model = build_model("msclip-tiny")
    images, text = reference_batch()
    out = model(images, text, keep=keep)
    loss = contrastive_loss(out["image_features"], out["text_features"], out["logit_scale"])
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("world", [1, 2])
def test_exact_accumulation_equals_one_big_batch(tmp_path, world):
    """16 samples as (16 / 4 / world) micro-batches of 4 on `world` ranks: the loss and the
    update (SGD, lr 1: the gradient itself) equal a single 16-sample step."""
    got = run_engine(world, tmp_path)
    loss, grads = big_batch_gradient()
    assert got["skipped"] == 0
    if world == 1:  # with 2 ranks each reports its local rows' loss (the mean over virtual ranks: float64)
        torch.testing.assert_close(got["loss"].float(), loss)
    for name, grad in grads.items():
        torch.testing.assert_close(got["delta"][name], grad, rtol=1e-3, atol=2e-6, msg=name)
    # the norm clipping divides by (engine.topology_free_grad_norm: every rank's partition, summed in fp64)
    norm = torch.cat([g.double().flatten() for g in grads.values()]).norm()
    assert math.isclose(float(got["grad_norm"]), float(norm), rel_tol=1e-5), (got["grad_norm"], norm)


def test_exact_accumulation_with_token_dropping_equals_one_big_batch(tmp_path):
    """model.token_drop: the kept positions travel with their rows through the micro-batch
    split, so the no-grad pass and the grad pass encode the same tokens and the update is
    still the one big batch's (a pass drawing its own tokens would break this)."""
    got = run_engine(1, tmp_path, "token_drop")
    loss, grads = big_batch_gradient(reference_keep())
    torch.testing.assert_close(got["loss"].float(), loss)
    assert not torch.equal(loss, big_batch_gradient()[0])  # the dropping did change the step
    for name, grad in grads.items():
        torch.testing.assert_close(got["delta"][name], grad, rtol=1e-3, atol=2e-6, msg=name)


def test_nonfinite_loss_skips_the_update(tmp_path):
    got = run_engine(1, tmp_path, "nan")
    assert got["skipped"] == 1
    assert all(d.abs().max() == 0 for d in got["delta"].values())


def test_logit_scale_master_copy_is_clamped(tmp_path):
    got = run_engine(1, tmp_path, "clamp")
    assert got["clamped"].item() == pytest.approx(MAX_LOGIT_SCALE)


# ---- checkpoints ------------------------------------------------------------------------------

def test_latest_ignores_half_written_checkpoints_and_prune_keeps_k(tmp_path):
    from pipeline.weights.files import COMPLETE, complete_tags, prune, resolve_resume
    for step, complete in [(100, True), (200, True), (300, True), (400, False)]:
        d = tmp_path / f"step_{step:08d}"
        d.mkdir()
        (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
        if complete:
            (d / COMPLETE).write_text(json.dumps({"step": step, "world_size": 1}))
    assert resolve_resume("latest", tmp_path) == (tmp_path, "step_00000300")
    prune(tmp_path, keep_last=2)
    assert complete_tags(tmp_path) == ["step_00000200", "step_00000300"]
    assert (tmp_path / "step_00000400").exists()  # newer than the newest complete: may be in progress
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "step_00000400"), tmp_path)
    assert resolve_resume("", tmp_path) is None


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_intact_one(tmp_path, capsys):
    """Issue 18: every checkpoint records its files' sha256; a flipped byte or a truncated
    file in the newest makes resume=latest take the previous one, in one line."""
    from pipeline.weights.files import COMPLETE, checksums, resolve_resume
    for step in (100, 200, 300):
        d = tmp_path / f"step_{step:08d}"
        (d / "zero").mkdir(parents=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(bytes(range(256)) * 40)
        (d / "zero" / "optim_rank1.pt").write_bytes(b"optimizer state" * 100)
        (d / COMPLETE).write_text(json.dumps({"step": step, "world_size": 1, "sha256": checksums(d)}))
    assert resolve_resume("latest", tmp_path, verify=True) == (tmp_path, "step_00000300")
    newest = tmp_path / "step_00000300" / "zero" / "optim_rank1.pt"
    data = bytearray(newest.read_bytes())
    data[777] ^= 0x01  # one flipped bit
    newest.write_bytes(bytes(data))
    (tmp_path / "step_00000200" / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    assert resolve_resume("latest", tmp_path, verify=True) == (tmp_path, "step_00000100")
    lines = [line for line in capsys.readouterr().out.splitlines() if "damaged" in line]
    assert len(lines) == 2 and "step_00000300 is damaged (zero/optim_rank1.pt does not match its checksum)" in lines[0]
    assert (tmp_path / "step_00000300.damaged").is_dir() and not (tmp_path / "step_00000300").exists()
    (tmp_path / "step_00000100" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"step_00000100 is damaged \(mp_rank_00_model_states.pt is missing\)"):
        resolve_resume(str(tmp_path / "step_00000100"), tmp_path, verify=True)  # named explicitly: no fallback


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PWNED_MARKER']}",))


def test_loading_never_unpickles_code(tmp_path, monkeypatch):
    from pipeline.weights.export import load_exported
    from pipeline.weights.checkpoint import safe_torch_load
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED_MARKER", str(marker))
    evil = tmp_path / "model.pt"
    torch.save({"state_dict": {}, "arch": {}, "payload": _RunsCode()}, evil)
    with pytest.raises(pickle.UnpicklingError):
        load_exported(evil)
    with safe_torch_load(), pytest.raises(pickle.UnpicklingError) as refused:
        torch.load(evil, weights_only=False)  # what DeepSpeed's loaders ask for
    assert not marker.exists()
    # the refusal says why, and never suggests the setting that would run the payload
    message = str(refused.value)
    assert f"{evil}: refused: it holds pickled objects other than weights" in message
    assert "weights_only" not in message and "\n" not in message
    torch.load  # restored after the block
    assert torch.load.__name__ == "load"
