"""The demo data and the small trained models the suite's evaluation tests read, built the
same way by the tests (tests/conftest.py) and by the bench that measures how far those
tests' thresholds stand from what training reaches (bench/convergence_margins.py)."""
from __future__ import annotations

from pathlib import Path

# The session's demo dataset (tests/conftest.py `demo_data`): python -m data_prep.demo with these
DEMO_BUILD = {"image_size": 64, "renders": 1, "crops_per_photo": 20, "samples_per_shard": 250, "seed": 0}


# The steps of the session's trained model (tests/conftest.py `trained_model`, msclip-s-tiny),
# which the evaluation tests' thresholds read. At 100 steps (bench/convergence_margins.py, 3
# demo builds x 3 seeds, 5 runs, 2026-12-07): zero-shot top-1 0.671 +- 0.044 (min 0.633) and
# probe - zero-shot 0.175 +- 0.031 (min 0.130), 9.5 and 5.7 std over their thresholds (at 400
# steps, 4x the cost: 27.6 and 3.4 std)
TRAINED_STEPS = 100
# The most steps clip-tiny trains for tests/test_suite.py's CLIP_benchmark CLI test: it stops at
# the first 20-step check where its predictions differ between samples (predicts_several_classes);
# a fixed count could not promise that: 1 to 8 classes at 120 steps over 5 runs, 2 to 6 at 40
# (bench/convergence_margins.py, bench/RESULTS.md)
CLIP_CLI_STEPS = 300


def demo_build_args(out: Path) -> list[str]:
    """`python -m data_prep.demo` arguments that build DEMO_BUILD into `out`."""
    return ["--output", str(out), *(a for key, value in DEMO_BUILD.items()
                                    for a in (f"--{key.replace('_', '-')}", str(value)))]


def train_demo_model(demo_data: Path, path: Path, steps: int = TRAINED_STEPS, model_name: str = "msclip-s-tiny",
                     seed: int = 0, also_at: dict[int, Path] | None = None, until=None,
                     check_every: int = 20, shards: str = "") -> Path:
    """A tiny model (msclip-s-tiny unless named) trained on the demo shards (single process,
    plain loop: the launcher's own runs are tested elsewhere), exported as the trainer
    exports it. `seed` draws the initial weights and the data order; `also_at` exports the
    model at earlier steps too ({step: path}); `until(model)`, asked every `check_every`
    steps, ends the training early when it says so (the export's `step` says where).
    `shards`: another shard spec to train on (default: the demo's digits and photos)."""
    import torch

    from pipeline.config import DataConfig
    from pipeline.data.loader import DataStream
    from pipeline.data.recipe import ImageSpec
    from pipeline.losses import contrastive_loss
    from pipeline.model import build_model

    torch.manual_seed(seed)
    model = build_model(model_name)
    lr, warmup = 5e-4, 50
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
    shards = shards or f"{demo_data}/shards/digits::{demo_data}/shards/photos"
    stream = DataStream(DataConfig(train_shards=shards, workers=1, shuffle_buffer=1000, resampled=True, readers=1),
                        batch_size=64, image=ImageSpec(64, model.arch.normalization), context_length=32, seed=seed)
    for step, batch in enumerate(stream):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
        out = model(batch["images"], batch["text"])
        loss = contrastive_loss(out["image_features"], out["text_features"], out["logit_scale"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step + 1 in (also_at or {}):
            export(model, model_name, step + 1, also_at[step + 1])
        if step + 1 == steps or until is not None and (step + 1) % check_every == 0 and asked(until, model):
            break
    export(model, model_name, step + 1, path)
    return path


def asked(until, model) -> bool:
    """until(model) on the model in eval mode, without gradients; training mode after."""
    import torch
    model.eval()
    with torch.no_grad():
        answer = bool(until(model))
    model.train()
    return answer


def predicts_several_classes(test_set, classes: int = 3):
    """An `until` for train_demo_model: the model's zero-shot predictions on `test_set`
    differ between samples (at least `classes` classes predicted). From its random init a
    ViT gives every image nearly one feature, so every sample gets the same class, and
    where training first leaves that varies with the data order (bench/convergence_margins.py)."""
    def enough(model) -> bool:
        from eval import zeroshot
        return len(set(zeroshot.evaluate(model, test_set, workers=0)["predictions"])) >= classes
    return enough


def export(model, model_name: str, step: int, path: Path):
    import torch

    from pipeline.config import to_dict
    torch.save({"state_dict": model.state_dict(), "arch": to_dict(model.arch), "model_name": model_name,
                "step": step}, path)
