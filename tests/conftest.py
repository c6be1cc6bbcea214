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
