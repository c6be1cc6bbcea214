import socket
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests (real launchers, real servers); they still run in CI")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """A small demo dataset built once per session the real way: images served from a
    loopback HTTP server, downloaded and sharded by the real img2dataset."""
    from data_prep.demo import build
    out = tmp_path_factory.mktemp("demo")
    build(str(out), image_size=64, renders=1, crops_per_photo=20, samples_per_shard=250, seed=0)
    return out


@pytest.fixture(scope="session")
def trained_model(demo_data, tmp_path_factory) -> Path:
    """msclip-s-tiny trained for 400 steps on the demo shards (single process, plain loop:
    the launcher's own runs are tested elsewhere), exported as the trainer exports it."""
    import torch
    from pipeline.config import DataConfig, to_dict
    from pipeline.data.loader import DataStream
    from pipeline.losses import contrastive_loss
    from pipeline.model import build_model

    torch.manual_seed(0)
    model = build_model("msclip-s-tiny")
    lr, warmup, steps = 5e-4, 50, 400
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
    shards = f"{demo_data}/shards/digits::{demo_data}/shards/photos"
    stream = DataStream(DataConfig(train_shards=shards, workers=1, shuffle_buffer=1000, resampled=True), batch_size=64,
                        image_size=64, normalization=model.arch.normalization, context_length=32)
    for step, batch in enumerate(stream):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
        out = model(batch["images"], batch["text"])
        loss = contrastive_loss(out["image_features"], out["text_features"], out["logit_scale"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step + 1 == steps:
            break
    path = tmp_path_factory.mktemp("trained") / "model.pt"
    torch.save({"state_dict": model.state_dict(), "arch": to_dict(model.arch), "model_name": "msclip-s-tiny",
                "step": steps}, path)
    return path
