"""The trained model as an MLflow Model (issue 15): logged into a run of a real MLflow
store, loaded back through mlflow.pyfunc, its embeddings equal to the model's own."""
import io

import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.config import to_dict
from pipeline.data.transforms import eval_transform
from pipeline.model import build_model
from pipeline.tokenizer import get_tokenizer


def jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (80, 60), color).save(buf, "JPEG")
    return buf.getvalue()


def test_logged_model_loads_through_mlflow_and_embeds_like_the_model(tmp_path, mlflow_server, s3_server):
    """Logged to a team's tracking server, which keeps artifacts in an S3 bucket (issue 32):
    the Model lands in the bucket and loads back through the server."""
    import mlflow

    from pipeline.tracking.mlflow_model import log_model
    torch.manual_seed(0)
    model = build_model("msclip-s-tiny").eval()
    exported = tmp_path / "model.pt"
    torch.save({"state_dict": model.state_dict(), "arch": to_dict(model.arch), "model_name": "msclip-s-tiny"},
               exported)
    mlflow.set_tracking_uri(mlflow_server.uri)
    mlflow.set_experiment("models")
    try:
        with mlflow.start_run():
            uri = log_model(exported)
        assert any(key.endswith("/MLmodel") for key in s3_server.keys("mlartifacts/")), s3_server.keys("mlartifacts/")
        served = mlflow.pyfunc.load_model(uri)
    finally:
        mlflow.set_tracking_uri(None)
    images = [jpeg((200, 30, 30)), jpeg((20, 90, 240)), None]
    captions = ["a red square", None, "a blue square"]
    out = served.predict(pd.DataFrame({"image": images, "text": captions}))
    transform = eval_transform(model.arch.image_size, model.arch.normalization)
    with torch.no_grad():
        expected_images = model.encode_image(torch.stack([transform(Image.open(io.BytesIO(b)).convert("RGB"))
                                                          for b in images[:2]]), normalize=True)
        expected_texts = model.encode_text(get_tokenizer()(["a red square", "a blue square"], 32), normalize=True)
    assert torch.allclose(torch.tensor(list(out["image_embedding"][:2])), expected_images, atol=1e-5)
    assert torch.allclose(torch.tensor([out["text_embedding"][0], out["text_embedding"][2]]), expected_texts, atol=1e-5)
    assert out["image_embedding"][2] is None and out["text_embedding"][1] is None
    assert served.metadata.get_input_schema().input_names() == ["image", "text"]
