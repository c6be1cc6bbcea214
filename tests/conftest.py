import os
import socket
import sys
from pathlib import Path

import pytest

from bench.demo_training import demo_build_args, train_demo_model  # noqa: F401 (tests import it from here)
from pipeline.cli import LOCAL_ONLY, keep_local  # importing it sets the no-telemetry defaults for the session

REPO_ROOT = Path(__file__).resolve().parents[1]  # the project is installed (pyproject.toml, launch/env.sh)
NETWORK_GUARD = REPO_ROOT / "tests" / "network_guard"  # its sitecustomize refuses and records outbound connections


def guarded_env(log: Path, **extra) -> dict[str, str]:
    """The environment of a command run as a user runs it, under the network guard: every
    Python process it starts records (in `log`) and refuses any connection beyond loopback.
    Without the variables that would hide a library's telemetry (the CI markers MLflow
    looks for, and the defaults pipeline.cli sets), so that what keeps the flow local is
    the entry points' own defaults."""
    hidden = {"CI", "PYTEST_CURRENT_TEST", *(name for choices, _ in LOCAL_ONLY for name in choices)}
    env = {k: v for k, v in os.environ.items() if k not in hidden}
    pythonpath = [str(NETWORK_GUARD), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    return {**env, "PYTHONPATH": os.pathsep.join(pythonpath), "NETWORK_GUARD_LOG": str(log), **extra}


def outbound(log: Path) -> list[str]:
    """What the guard refused: one line per attempt (the process, the target, where from)."""
    import json
    if not log.exists():
        return []
    return [f"{r['argv']} {r['kind']} {r['target']} from {r['stack'][-3:]}"
            for r in map(json.loads, log.read_text().splitlines())]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests (real launchers, real servers); they still run in CI")
    config.addinivalue_line("markers", "gpu: real-CUDA tests (bench/gpu.sh); skipped where no GPU is present")


def new_in_checkout() -> set[str]:
    """Untracked and ignored paths of the checkout, as git lists them (.venv aside)."""
    import subprocess
    listed = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=REPO_ROOT, capture_output=True,
                            text=True).stdout.splitlines()
    return {line[3:] for line in listed if line[:2] in ("??", "!!") and line[3:] != ".venv/"}


@pytest.fixture(scope="session", autouse=True)
def checkout_stays_clean():
    """Tests write under their temporary folders, never into the checkout (an MLflow
    experiment made without an artifact location once put ./mlruns there): a path that
    is new at the end of the session is an error of the last test."""
    before = new_in_checkout()
    yield
    added = sorted(new_in_checkout() - before)
    assert not added, f"the test session left new files in the checkout: {', '.join(added[:10])}"


@pytest.fixture(autouse=True)
def mlflow_store_stays_in_its_test(monkeypatch):
    """No test sees the developer's MLFLOW_TRACKING_URI (under the store rule it would send
    every test run to their server), and none leaves one behind: mlflow.set_tracking_uri,
    which tests call to read their store back, exports it, and later training subprocesses
    would log into that test's store. monkeypatch puts the variable back as it was."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # records its value (delenv of an absent one records nothing)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")


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
    loopback HTTP server, downloaded and sharded by the real img2dataset.
    MSCLIP_DEMO_DATA names one built earlier by the same `build` (bench/gpu.sh on a GPU
    machine that has no img2dataset: the dataset travels with the checkout)."""
    import os
    if os.environ.get("MSCLIP_DEMO_DATA"):
        return Path(os.environ["MSCLIP_DEMO_DATA"])
    import subprocess
    out = tmp_path_factory.mktemp("demo")
    # built by the command a user types, under the network guard (test_demo.py reads its record)
    done = subprocess.run([sys.executable, "-m", "data_prep.demo", *demo_build_args(out)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600,
                          env=guarded_env(demo_network_log(out)))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def demo_network_log(demo: Path) -> Path:
    """Where the guard recorded the demo data build's outbound attempts (none, if it is local)."""
    return demo.parent / f"{demo.name}-network.jsonl"


@pytest.fixture(scope="session")
def trained_model(demo_data, tmp_path_factory) -> Path:
    """msclip-s-tiny trained on the demo shards (train_demo_model, TRAINED_STEPS steps: the
    thresholds the tests read on it stand several std clear, bench/convergence_margins.py)."""
    return train_demo_model(demo_data, tmp_path_factory.mktemp("trained") / "model.pt")


@pytest.fixture(scope="session")
def noisy(demo_data, tmp_path_factory):
    """(shards, Planted): 2 of the demo's digit shards with noise planted (bench/noisy_pool.py:
    captions swapped between digits, near-copies of images)."""
    from bench.noisy_pool import plant_noise
    root = tmp_path_factory.mktemp("noisy")
    return root / "shards", plant_noise(demo_data / "shards" / "digits", root / "shards", shards=2)


@pytest.fixture(scope="session")
def embedded(noisy, trained_model, tmp_path_factory) -> Path:
    """The noisy pool embedded by `trained_model` in two processes as torchrun would start them
    (RANK / WORLD_SIZE), each taking every other shard."""
    from data_prep.curate import embed
    out = tmp_path_factory.mktemp("embedded") / "emb"
    shards, _ = noisy
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WORLD_SIZE", "2")
        for rank in ("0", "1"):
            env.setenv("RANK", rank)
            embed(str(shards), str(trained_model), str(out), batch_size=128, workers=1)
    return out


@pytest.fixture(scope="session")
def curated(noisy, embedded, tmp_path_factory) -> tuple[Path, Path, dict]:
    """(kept.parquet, the resharded shards, reshard's counts): the best half of the noisy pool
    by CLIP score, resharded at 200 samples a shard; tests/test_curate.py checks it and
    tests/test_train_e2e.py trains on it with the launcher."""
    from data_prep.curate import filter_pool, reshard
    root = tmp_path_factory.mktemp("curated")
    filter_pool(str(embedded), str(root / "kept.parquet"), top_fraction=0.5)
    counts = reshard(str(noisy[0]), str(root / "kept.parquet"), str(root / "shards"), samples_per_shard=200)
    return root / "kept.parquet", root / "shards", counts


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (a sqlite backend, artifacts proxied by the
    server), as a team runs it. `stop()` and `start()` keep the same port and store."""

    def __init__(self, root: Path, artifacts: str | None = None, admin_password: str = ""):
        """admin_password: run MLflow's basic-auth app (`--app-name basic-auth`), its user
        store in `root`, with `admin` as its administrator."""
        self.root, self.port, self.proc = root, free_port(), None
        self.artifacts = artifacts or str(root / "artifacts")
        self.admin_password = admin_password
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120):
        import subprocess
        import time
        import urllib.request
        import os
        env, auth = dict(os.environ), []
        keep_local(env)  # a server we start sends no telemetry either
        if self.admin_password:
            (self.root / "auth.ini").write_text(
                f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{self.root / 'auth.db'}\n"
                f"admin_username = admin\nadmin_password = {self.admin_password}\n"
                f"authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
            env.update(MLFLOW_AUTH_CONFIG_PATH=str(self.root / "auth.ini"), MLFLOW_FLASK_SERVER_SECRET_KEY="test-only")
            auth = ["--app-name", "basic-auth"]
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", self.artifacts, *auth],
            stdout=open(self.root / "server.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"mlflow server on {self.uri} did not answer in {timeout} s")

    def stop(self):
        import os
        import signal
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server on loopback (data_prep.serve.LoopbackS3: moto's server
    mode), the session's environment pointed at it the standard AWS way."""
    from data_prep.serve import LoopbackS3
    server = LoopbackS3(tmp_path_factory.mktemp("s3_server") / "moto.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, s3_server):
    """The team's set-up: a sqlite backend, artifacts proxied by the server into the S3
    bucket (every test that reads artifacts back reads them from the object store)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"), s3_server.url("mlartifacts")).start()
    yield server
    server.stop()
