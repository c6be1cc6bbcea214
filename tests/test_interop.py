"""OpenAI / open_clip weights in and out (issue 15), against open_clip itself: random
weights in open_clip's own models stand in for released ones (no downloads here)."""
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from pipeline.weights.__main__ import main as weights_main
from pipeline.weights.export import load_exported
from pipeline.weights.interop import InteropError, UntrustedFileError, import_weights, open_clip_arch, read_state_dict
from pipeline.model import build_model
from pipeline.tokenizer import get_tokenizer

open_clip = pytest.importorskip("open_clip")

CAPTIONS = ["a photo of a dog on a beach", "the digit seven, handwritten"]


def random_open_clip(name: str) -> torch.nn.Module:
    """open_clip's model with every tensor randomized (LayerNorms included, which its
    init leaves at 1/0, so that a mapping that mixes them up shows)."""
    torch.manual_seed(0)
    model = open_clip.create_model(name).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        model.logit_scale.fill_(3.1)
    return model


def outputs(model, images, text):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(text), model.logit_scale.reshape(())


def assert_same(a, b, tol=1e-5):
    for x, y in zip(a, b):
        assert (x - y).abs().max().item() <= tol * max(1.0, y.abs().max().item()), (x - y).abs().max().item()


@pytest.mark.parametrize("source,ours,suffix", [("ViT-B-32-quickgelu", "clip-b32", ".bin"),
                                                 ("ViT-B-32", "clip-b32", ".safetensors"),
                                                 ("ViT-B-16", "clip-b16", ".bin")])
def test_open_clip_round_trip_gives_the_same_embeddings(tmp_path, source, ours, suffix):
    reference = random_open_clip(source)
    path = tmp_path / f"open_clip{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    else:  # open_clip's training checkpoints: a dict with the state dict under "state_dict", DDP's prefix
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    imported = tmp_path / "ours.pt"
    assert weights_main(["import", "--format", "open_clip", "--input", str(path), "--model", ours,
                            "--source", source, "--output", str(imported)]) == 0
    model, payload = load_exported(imported)
    assert payload["arch"]["activation"] == ("quick_gelu" if "quickgelu" in source else "gelu")
    assert payload["source"]["format"] == "open_clip" and len(payload["source"]["sha256"]) == 64
    torch.manual_seed(1)
    images = torch.randn(2, 3, 224, 224)
    text = get_tokenizer()(CAPTIONS, 77)
    expected = outputs(reference, images, text)
    assert_same(outputs(model, images, text), expected)

    exported = tmp_path / "back.pt"
    assert weights_main(["export", "--format", "open_clip", "--checkpoint", str(imported),
                            "--output", str(exported)]) == 0
    back = open_clip.create_model(source, pretrained=str(exported)).eval()
    assert_same(outputs(back, images, text), expected)


def test_the_activation_matters_and_the_source_must_be_named(tmp_path):
    """A LAION (GELU) state dict imported as QuickGELU would load without a missing key
    and give other embeddings: the source model is a required fact."""
    reference = random_open_clip("ViT-B-32")
    path = tmp_path / "laion.bin"
    torch.save(reference.state_dict(), path)
    with pytest.raises(InteropError, match="--source: name the open_clip model"):
        import_weights(path, "open_clip", "clip-b32")
    wrong, _ = import_weights(path, "open_clip", "clip-b32", "ViT-B-32-quickgelu")
    model = build_model(wrong["arch"]).eval()
    model.load_state_dict(wrong["state_dict"])
    text = get_tokenizer()(CAPTIONS, 77)
    with torch.no_grad():
        assert (model.encode_text(text) - reference.encode_text(text)).abs().max() > 1e-3
    with pytest.raises(InteropError, match="--model clip-b16 does not match --source ViT-B-32: patch_size 16 vs 32"):
        import_weights(path, "open_clip", "clip-b16", "ViT-B-32")


def test_missing_and_unexpected_keys_are_errors_unless_partial(tmp_path):
    state = random_open_clip("ViT-B-32").state_dict()
    del state["visual.ln_post.weight"]
    state["visual.extra_head.weight"] = torch.zeros(3)
    path = tmp_path / "partial.bin"
    torch.save(state, path)
    with pytest.raises(InteropError, match=r"missing: visual.ln_post.weight; unexpected: visual.extra_head.weight"):
        import_weights(path, "open_clip", "clip-b32", "ViT-B-32")
    payload, report = import_weights(path, "open_clip", "clip-b32", "ViT-B-32", allow_partial=True)
    assert report["missing"] == ["visual.ln_post.weight"] and report["unexpected"] == ["visual.extra_head.weight"]


def test_sources_this_architecture_cannot_express_are_refused():
    assert open_clip_arch("ViT-L-14")["vision_heads"] == 16  # 1024 wide, heads of 64
    with pytest.raises(InteropError, match="RN50: open_clip config fields this architecture does not express"):
        open_clip_arch("RN50")
    with pytest.raises(InteropError, match="not an open_clip model name"):
        open_clip_arch("ViT-B-33")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"logit_scale": torch.zeros(())}, "payload": _RunsCode(marker)}, path)
    with pytest.raises(UntrustedFileError, match="refused, it holds objects that would run code"):
        read_state_dict(path)
    assert weights_main(["import", "--format", "open_clip", "--input", str(path), "--model", "clip-b32",
                            "--source", "ViT-B-32", "--output", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "weights_only=False" not in err
    assert not marker.exists()


def test_torchscript_archives_are_refused_with_the_safe_alternative(tmp_path):
    path = tmp_path / "ViT-B-32.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    with pytest.raises(UntrustedFileError, match="a TorchScript archive .* use the same weights as a state dict"):
        read_state_dict(path)


def test_msclip_models_keep_our_format(tmp_path):
    model = build_model("msclip-tiny")
    from pipeline.config import to_dict
    path = tmp_path / "msclip.pt"
    torch.save({"state_dict": model.state_dict(), "arch": to_dict(model.arch), "model_name": "msclip-tiny"}, path)
    assert weights_main(["export", "--format", "open_clip", "--checkpoint", str(path),
                            "--output", str(tmp_path / "x.pt")]) == 2


# ---- model.init_from ---------------------------------------------------------------------------

def our_export(path, name="clip-tiny", seed=123, **overrides):
    from pipeline.config import to_dict
    torch.manual_seed(seed)
    model = build_model(name, overrides)
    torch.save({"state_dict": model.state_dict(), "arch": to_dict(model.arch), "model_name": name}, path)
    return model


def test_resizing_the_position_embedding_to_its_own_grid_is_the_identity():
    from pipeline.weights.interop import resize_positional_embedding
    embedding = torch.randn(1 + 7 * 7, 32)
    assert torch.allclose(resize_positional_embedding(embedding, 7), embedding, atol=1e-6)
    resized = resize_positional_embedding(embedding, 9)
    assert resized.shape == (1 + 81, 32) and torch.equal(resized[0], embedding[0])  # CLS untouched


def test_init_from_another_image_size_interpolates_and_says_so(tmp_path):
    from pipeline.weights.interop import initial_weights
    from pipeline.model.configs import resolve_arch
    source = our_export(tmp_path / "64px.pt")  # 64 px, patch 16: a 4 x 4 grid
    arch = resolve_arch("clip-tiny", {"image_size": 96})  # 6 x 6
    state, report = initial_weights(str(tmp_path / "64px.pt"), "auto", "", arch)
    assert state["visual.positional_embedding"].shape == (37, 128)
    assert "visual.positional_embedding interpolated from 17 to 37 positions" in report and "0 missing" in report
    assert torch.equal(state["text.token_embedding.weight"], source.state_dict()["text.token_embedding.weight"])
    build_model(arch).load_state_dict(state)  # loads as it is


def test_init_from_refuses_what_it_cannot_start_from(tmp_path):
    from pipeline.weights.interop import initial_weights
    from pipeline.model.configs import resolve_arch
    our_export(tmp_path / "gelu.pt", activation="gelu")
    with pytest.raises(InteropError, match="trained with gelu, the model uses quick_gelu: set "
                                           "model.overrides.activation=gelu"):
        initial_weights(str(tmp_path / "gelu.pt"), "auto", "", resolve_arch("clip-tiny"))
    our_export(tmp_path / "msclip-s.pt", name="msclip-s-tiny")  # a conv stem and branch, no patch embedding
    with pytest.raises(InteropError, match=r"model.init_from: .*msclip-s.pt: \d+ mapped; 13 missing; \d+ unexpected; "
                                           r"missing: visual.blocks.5.* unexpected: visual.adapters"):
        initial_weights(str(tmp_path / "msclip-s.pt"), "auto", "", resolve_arch("clip-tiny"))
    marker = tmp_path / "ran"
    torch.save({"arch": {}, "state_dict": {}, "x": _RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UntrustedFileError):
        initial_weights(str(tmp_path / "evil.pt"), "auto", "", resolve_arch("clip-tiny"))
    assert not marker.exists()


# ---- the released MS-CLIP checkpoints -------------------------------------------------------------

REFERENCE = json.loads((Path(__file__).parent / "data" / "msclip_reference.json").read_text())
OURS_FOR = {"b32-yfcc-msclips": "msclip-s-b32", "b16-yfcc-msclips": "msclip-s-b16",
            "es-b32 (b32-yfcc-msclips, PARALLEL_IN_V false)": "msclip-es-b32",
            "b32 (b32-yfcc-msclips, no early conv, no branch, N_LAYERS 0)": "msclip-b32"}


@pytest.mark.parametrize("variant", list(OURS_FOR))
def test_every_reference_key_maps_and_the_sharing_is_the_same(variant):
    """Names and shapes of the reference CLIP's state dict per released config (facts in
    tests/data/msclip_reference.json, generated once from Hxyou/MSCLIP): every key maps,
    every tensor of ours is covered, shapes equal, and what the reference shares between
    the towers is one tensor in ours."""
    from pipeline.weights.interop import from_msclip, key_report
    facts = REFERENCE["variants"][variant]
    with torch.device("meta"):
        model = build_model(OURS_FOR[variant])
    mapped, unexpected = from_msclip({k: torch.empty(s, device="meta") for k, s in facts["shapes"].items()},
                                     model.arch)
    report = key_report(model, mapped, unexpected)
    assert report["missing"] == report["unexpected"] == report["shapes"] == []
    ours = model.state_dict(keep_vars=True)
    renamed = dict(zip(facts["shapes"], mapped))  # from_msclip keeps the order
    for name, original in facts["shared"].items():
        assert ours[renamed[name]] is ours[renamed[original]], (name, original)


@pytest.mark.parametrize("variant", ["b32-yfcc-msclips", "b16-yfcc-msclips"])
def test_a_released_layout_loads_into_our_model_without_a_missing_key(tmp_path, variant):
    from msclip_weights import seeded_state_dict
    facts = REFERENCE["variants"][variant]
    path = tmp_path / f"{variant}_ckpt.pth"
    torch.save(seeded_state_dict(facts["shapes"], facts["shared"]), path)
    payload, report = import_weights(path, "msclip", OURS_FOR[variant])
    assert report["missing"] == report["unexpected"] == [] and report["mapped"] == len(payload["state_dict"])


def test_seeded_reference_weights_give_the_reference_codes_outputs(tmp_path):
    """The reference CLIP at tiny size (its b16 MS-CLIP-S config scaled down to our
    msclip-s-tiny), seeded weights, its encode_image / encode_text in eval mode: outputs
    computed once by the reference code, stored in the fixture. Imported, ours match."""
    from msclip_weights import probe_inputs, seeded_state_dict
    tiny = REFERENCE["tiny"]
    path = tmp_path / "tiny_ckpt.pth"
    torch.save(seeded_state_dict(tiny["shapes"], tiny["shared"]), path)
    imported = tmp_path / "ours.pt"
    assert weights_main(["import", "--format", "msclip", "--input", str(path), "--model", "msclip-s-tiny",
                            "--output", str(imported)]) == 0
    model, _ = load_exported(imported)
    images, text = probe_inputs(context_length=32)
    with torch.no_grad():
        got = (model.encode_image(images), model.encode_text(text), model.logit_scale.reshape(()))
    expected = (torch.tensor(tiny["image_features"]), torch.tensor(tiny["text_features"]),
                torch.tensor(tiny["logit_scale"]))
    assert_same(got, expected)


def test_a_file_whose_shared_copies_differ_is_refused(tmp_path):
    from msclip_weights import seeded_state_dict
    tiny = REFERENCE["tiny"]
    state = seeded_state_dict(tiny["shapes"], tiny["shared"])
    name = next(iter(tiny["shared"]))
    state[name] = state[name] + 1  # the text copy of a shared tensor no longer equals the vision copy
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(InteropError, match="are one shared tensor in this model but differ in the file"):
        import_weights(tmp_path / "bad.pth", "msclip", "msclip-s-tiny")


def test_init_from_reads_a_released_msclip_checkpoint(tmp_path):
    from msclip_weights import seeded_state_dict
    from pipeline.weights.interop import initial_weights
    from pipeline.model.configs import resolve_arch
    tiny = REFERENCE["tiny"]
    torch.save(seeded_state_dict(tiny["shapes"], tiny["shared"]), tmp_path / "tiny_ckpt.pth")
    state, report = initial_weights(str(tmp_path / "tiny_ckpt.pth"), "auto", "", resolve_arch("msclip-s-tiny"))
    assert report.endswith("0 missing; 0 unexpected")
    build_model("msclip-s-tiny").load_state_dict(state)


def test_eval_of_released_weights_is_a_reference_run_beside_the_trained_ones(tmp_path, demo_data, monkeypatch,
                                                                            capsys):
    """`python -m eval --format msclip` imports on the fly and tags the run reference=true
    with the file's sha256; `python -m eval.compare` shows it as a reference line. Neither
    is told the store: both follow the one rule (MLFLOW_TRACKING_URI, else
    ./runs/mlflow.db) and say which store they use."""
    import csv

    from mlflow.tracking import MlflowClient

    from eval.__main__ import main as eval_main
    from eval.compare import main as compare_main
    from msclip_weights import seeded_state_dict
    from pipeline.tracking.store import resolve_tracking_uri
    tiny = REFERENCE["tiny"]
    path = tmp_path / "downloads" / "weights" / "released_ckpt.pth"
    path.parent.mkdir(parents=True)
    torch.save(seeded_state_dict(tiny["shapes"], tiny["shared"]), path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/mlflow.db")
    assert resolve_tracking_uri() == "sqlite:////elsewhere/mlflow.db"
    assert resolve_tracking_uri("http://given:5000") == "http://given:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert eval_main(["--checkpoint", str(path), "--format", "msclip", "--model", "msclip-s-tiny", "--zeroshot",
                      str(demo_data / "eval" / "digits"), "--workers", "0",
                      "--experiment", "cmp", "--output", str(tmp_path / "r.json")]) == 0
    # the store eval used is not exported (mlflow.set_tracking_uri would): a training run
    # started next from this process still logs into its own store
    assert "MLFLOW_TRACKING_URI" not in os.environ
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cmp").experiment_id])
    assert run.data.tags["reference"] == "true" and run.data.tags["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "eval/zeroshot/digits/acc1" in run.data.metrics
    assert client.get_experiment_by_name("cmp").tags["mlflow.experimentKind"] == "custom_model_development"
    table = tmp_path / "t.csv"
    assert compare_main(["--experiment", "cmp", "--csv", str(table), "--no-plot"]) == 0
    assert capsys.readouterr().out.count(f"mlflow store: {uri}\n") == 2
    header, row = list(csv.reader(table.open()))
    assert dict(zip(header, row))["kind"] == "reference"
