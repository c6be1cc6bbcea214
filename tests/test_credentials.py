"""Credentials never leave the process (issue 33): one redaction wherever a run writes,
and tracking servers that ask who we are (MLflow's basic-auth app, really started)."""
import io
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import MlflowServer, free_port
from pipeline.redact import RedactingStream, redact

ADMIN, ALICE = ("admin", "admin-pw-7Qx2"), ("alice", "alice-pw-9Kt4")


@pytest.mark.parametrize("raw,shown", [
    ("https://b.s3.amazonaws.com/d/00001.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20261204"
     "&X-Amz-Signature=9f8e7d&partNumber=1",
     "https://b.s3.amazonaws.com/d/00001.tar?X-Amz-Algorithm=***&X-Amz-Credential=***&X-Amz-Signature=***"
     "&partNumber=1"),
    ("http://alice:s3cr3t@127.0.0.1:5000/api", "http://***@127.0.0.1:5000/api"),
    ("https://token@gs.example/x.tar?GoogleAccessId=a&Signature=b&Expires=1",
     "https://***@gs.example/x.tar?GoogleAccessId=a&Signature=***&Expires=1"),
    ("pipe:curl -s 'https://h/a.tar?sig=abc&se=2026'", "pipe:curl -s 'https://h/a.tar?sig=***&se=2026'"),
    ("https://h/x?access_token=t1#top", "https://h/x?access_token=***#top"),
    ("https://h/x?API_KEY=k&Password=p", "https://h/x?API_KEY=***&Password=***"),
    # what users write in pipe: specs and command lines (issue 44)
    ("pipe:curl -sL -H 'Authorization: Bearer hf_abcdefghijklmnopqrstuvwx' https://huggingface.co/d/0.tar",
     "pipe:curl -sL -H 'Authorization: Bearer ***' https://huggingface.co/d/0.tar"),
    ('pipe:curl -s --header "X-Api-Key: k3y" https://h/0.tar', 'pipe:curl -s --header "X-Api-Key: ***" https://h/0.tar'),
    ("pipe:curl -s -u alice:pa55 https://h/0.tar", "pipe:curl -s -u *** https://h/0.tar"),
    ("pipe:curl -s --user='alice:pa 55' https://h/0.tar", "pipe:curl -s --user='***' https://h/0.tar"),
    ("pipe:AWS_SECRET_ACCESS_KEY=abc/def+1 HF_TOKEN=t0k aws s3 cp s3://b/0.tar -",
     "pipe:AWS_SECRET_ACCESS_KEY=*** HF_TOKEN=*** aws s3 cp s3://b/0.tar -"),
    ("s3://AKIAEXAMPLE:wJalr/K7MDENG+bPx@bucket/shards", "s3://***@bucket/shards"),  # a secret with a '/'
    ("https://u:p@ss@h/x.tar", "https://***@h/x.tar"),  # userinfo up to the last '@'
    ("sig=abc&se=2026-12-31&sp=r", "sig=***&se=2026-12-31&sp=r"),  # a SAS token on its own
    ("password: hunter2", "password: ***"), ('{"hf_token": "abc", "steps": 3}', '{"hf_token": "***", "steps": 3}'),
    ("tracking.password=x", "tracking.password=***"),
    ("key id AKIAIOSFODNN7EXAMPLE, token hf_abcdefghijklmnopqrstuvwx", "key id ***, token ***"),
    # nothing to redact: left exactly as it is
    ("s3://bucket/shards/{00000..00099}.tar", "s3://bucket/shards/{00000..00099}.tar"),
    ("data.read_timeout_seconds=60 optim.lr=5e-4", "data.read_timeout_seconds=60 optim.lr=5e-4"),
    ("http://host/a@b", "http://host/a@b"),
    ("http://host:8080/a@b", "http://host:8080/a@b"),
    ("model.token_drop=0.5 tokens_kept: 0.5 init_from_keys: 12", "model.token_drop=0.5 tokens_kept: 0.5 init_from_keys: 12"),
    ("[train] step 3/6 loss 2.1000 123.4 samples/s", "[train] step 3/6 loss 2.1000 123.4 samples/s"),
    ("-H 'Authorization: Bearer ${env:HF_TOKEN}' token=${env:T}", "-H 'Authorization: Bearer ${env:HF_TOKEN}' token=${env:T}"),
])
def test_redaction_hides_credentials_and_says_so(raw, shown):
    assert redact(raw) == shown
    assert redact({"k": [raw, (raw, 3)], raw: None}) == {"k": [shown, (shown, 3)], shown: None}


def test_values_under_secret_keys_are_hidden_whole():
    """A dict's credential keys (a config section, a header table) hide their value whatever
    it looks like; keys that only contain such a word do not."""
    assert redact({"password": "p w", "api_key": 12345, "headers": {"Private-Token": "x"}, "token_drop": 0.5,
                   "tokens_kept": 0.5, "api_key_file": "/etc/k"}) == \
        {"password": "***", "api_key": "***", "headers": {"Private-Token": "***"}, "token_drop": 0.5,
         "tokens_kept": 0.5, "api_key_file": "/etc/k"}


def test_a_redacting_stream_sees_a_url_split_across_writes():
    sink = io.StringIO()
    out = RedactingStream(sink)
    out.write("[tracking] MLflow at http://alice:s3")
    out.write("cr3t@127.0.0.1:5000 is unavailable\nnext ")
    out.flush()
    assert sink.getvalue() == "[tracking] MLflow at http://***@127.0.0.1:5000 is unavailable\nnext "


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """`mlflow server --app-name basic-auth` on loopback, and a user made through its API."""
    from mlflow.server.auth.client import AuthServiceClient
    server = MlflowServer(tmp_path_factory.mktemp("auth_server"), admin_password=ADMIN[1]).start()
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update(MLFLOW_TRACKING_USERNAME=ADMIN[0], MLFLOW_TRACKING_PASSWORD=ADMIN[1])
    try:
        AuthServiceClient(server.uri).create_user(*ALICE)
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    yield server
    server.stop()


def log_three_steps(run_dir, uri: str, experiment: str):
    from pipeline.config import TrackingConfig
    from pipeline.tracking.logger import MetricsLogger
    cfg = TrackingConfig(tracking_uri=uri, experiment=experiment, system_metrics=False, flush_seconds=30)
    logger = MetricsLogger(run_dir, cfg, run_dir.parent, "r")
    logger.log_params({"train.steps": 3, "data.train_shards": "https://h/0.tar?X-Amz-Signature=deadbeef"})
    for step in (1, 2, 3):
        logger.log_metrics({"loss": 3.0 - step}, step)
    logger.close()
    return logger


def stored_run(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def test_basic_auth_right_credentials_log_wrong_ones_are_said_once_and_kept_for_sync(tmp_path, auth_server,
                                                                                    monkeypatch, capsys):
    from pipeline.tracking.__main__ import main as tracking_main
    # the environment's credentials (MLflow's own variables), as docs/tracking.md recommends
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ALICE[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ALICE[1])
    log_three_steps(tmp_path / "right", auth_server.uri, "auth-right")
    (run,) = stored_run(auth_server.uri, "auth-right")
    assert run.info.status == "FINISHED" and run.data.metrics == {"loss": 0.0}
    assert run.data.params["data.train_shards"] == "https://h/0.tar?X-Amz-Signature=***"
    # a password in the URL still works, and is written down without it
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    with_password = auth_server.uri.replace("http://", f"http://{ALICE[0]}:{ALICE[1]}@")
    log_three_steps(tmp_path / "userinfo", with_password, "auth-userinfo")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ALICE[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ALICE[1])
    (run,) = stored_run(auth_server.uri, "auth-userinfo")
    assert run.info.status == "FINISHED"
    for name in ("metrics.jsonl", "mlflow_sync.json"):
        text = (tmp_path / "userinfo" / name).read_text()
        assert ALICE[1] not in text and "http://***@127.0.0.1" in text, name
    capsys.readouterr()
    # wrong credentials: training (here: logging) goes on, one line says the server refused
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-her-password")
    log_three_steps(tmp_path / "wrong", auth_server.uri, "auth-wrong")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1 and "refused the credentials (HTTP 401" in lines[0], lines
    records = [json.loads(line) for line in (tmp_path / "wrong" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ALICE[1])
    assert stored_run(auth_server.uri, "auth-wrong") == []
    # everything was kept: a sync with the right credentials sends it all
    assert tracking_main(["sync", str(tmp_path / "wrong"), "--tracking-uri", auth_server.uri]) == 0
    (run,) = stored_run(auth_server.uri, "auth-wrong")
    assert run.info.status == "FINISHED" and run.data.metrics == {"loss": 0.0}


@pytest.mark.slow
def test_secrets_in_a_shard_url_and_a_tracking_url_go_nowhere(tmp_path, demo_data, auth_server):
    """Issue 33: a run with a signed shard URL and a tracking URL with a password copied both
    into the server's params, tags and artifacts, into the run folder and into stdout. Two
    processes through the launcher, shards over HTTP each signed, the tracking URL with
    alice's password: the run trains and logs, and neither secret is anywhere it wrote.
    Nothing in the run folder is writable by others. Issue 44: what users also write, a
    `pipe:curl` shard with `-H 'Authorization: Bearer ...'` and `-u user:password`, and a
    header whose value is a `${env:...}` reference, is written nowhere either; the run
    folder and its checkpoints are the owner's alone under a umask of 000."""
    from mlflow.tracking import MlflowClient

    from faulty_store import FaultyStore
    from pipeline.data.manifest import Manifest
    from test_train_e2e import DEEPSPEED, REPO_ROOT, ds_config, jsonl, run_config
    from test_tracking_server import artifact_paths
    signature, bearer, curl_password, header_key = "5ec12e7516a7u2e0f00d", "b3arer-7Yq1", "curl-pw-4Rt8", "k3y-2Wn6"
    digits = demo_data / "shards" / "digits"
    with FaultyStore(digits) as store:
        # every shard read by curl, with a bearer header, basic auth and a signed URL
        shards = Manifest.read(digits).shards
        signed = "::".join(f"pipe:curl -sf -H 'Authorization: Bearer {bearer}' -u alice:{curl_password} "
                           f"'{store.url(s.name)}?X-Amz-Expires=3600&X-Amz-Signature={signature}'" for s in shards)
        with_password = auth_server.uri.replace("http://", f"http://{ALICE[0]}:{ALICE[1]}@")
        config = run_config(tmp_path, demo_data, "signed", data={"train_shards": signed, "resampled": True,
                                                                 "train_num_samples": 1000, "shuffle_buffer": 0,
                                                                 "http_headers": {"X-Api-Key": "${env:SHARD_KEY}"}},
                            train={"steps": 4, "log_every": 2}, tracking={"tracking_uri": with_password,
                                                                         "experiment": "secrets"})
        # secrets live in the config file, not on the command line (the launcher prints its command)
        result = subprocess.run([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()),
                                 "launch/train.py", "--deepspeed_config", str(ds_config(tmp_path)), "--config",
                                 str(config)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                                env={**os.environ, "SHARD_KEY": header_key}, preexec_fn=lambda: os.umask(0o000))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "signed"
    assert [r["step"] for r in jsonl(run_dir) if "loss" in r] == [2, 4]
    assert sum(store.requests.values()) >= 2  # the shards were read (by curl)
    for folder in (run_dir, run_dir / "checkpoints"):  # under umask 000: the owner's alone
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, oct(folder.stat().st_mode)
    secrets = (signature, ALICE[1], bearer, curl_password, header_key)
    for secret in secrets:
        assert secret not in result.stdout and secret not in result.stderr, secret
    for path in run_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(s.encode() in data for s in secrets), path
    written = (run_dir / "config.yaml").read_text()
    assert "X-Amz-Signature=***" in written and "Bearer ***" in written  # a reader sees that it was there
    assert "${env:SHARD_KEY}" in written  # a reference is written as it is
    os.environ.update(MLFLOW_TRACKING_USERNAME=ADMIN[0], MLFLOW_TRACKING_PASSWORD=ADMIN[1])
    try:
        client = MlflowClient(tracking_uri=auth_server.uri)
        (run,) = client.search_runs([client.get_experiment_by_name("secrets").experiment_id])
        shown = json.dumps({"params": run.data.params, "tags": run.data.tags})
        assert "X-Amz-Signature=***" in run.data.params["data.train_shards"]
        assert run.data.params["tracking.tracking_uri"] == auth_server.uri.replace("http://", "http://***@")
        downloaded = client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts"))
        assert artifact_paths(client, run.info.run_id) >= {"config.yaml", "model.json", "ds_config.json"}
        artifacts = b"".join(p.read_bytes() for p in Path(downloaded).rglob("*") if p.is_file())
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME")
        os.environ.pop("MLFLOW_TRACKING_PASSWORD")
    for secret in secrets:
        assert secret not in shown and secret.encode() not in artifacts, secret
