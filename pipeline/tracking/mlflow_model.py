"""The trained model as an MLflow Model (`tracking.log_model=true`): a pyfunc that turns
images and captions into embeddings, so that `mlflow.pyfunc.load_model(uri)` serves it
(mlflow models serve, Spark UDFs, batch inference) without this repository installed:
the `pipeline` package travels with it as code.

Input: a DataFrame with an `image` column (encoded image bytes: JPEG, PNG, ...) and/or a
`text` column (captions); a row may leave either empty. Output: a DataFrame with
`image_embedding` and `text_embedding` (L2-normalized lists of floats, None where the
row had no input), computed as evaluation does (the eval transform, the CLIP tokenizer).
"""
from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc

REPO_ROOT = Path(__file__).resolve().parents[2]


class CLIPEmbeddings(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from pipeline.weights.export import load_exported
        self.model, _ = load_exported(context.artifacts["weights"])

    def predict(self, context, model_input, params=None):
        import io

        import pandas as pd
        import torch
        from PIL import Image

        from pipeline.data.transforms import eval_transform
        from pipeline.tokenizer import get_tokenizer
        arch = self.model.arch
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        empty = [None] * len(frame)
        out = pd.DataFrame({"image_embedding": empty, "text_embedding": empty}, index=frame.index, dtype=object)
        with torch.no_grad():
            if "image" in frame:
                rows = frame["image"].dropna()
                rows = rows[rows.map(len) > 0]
                if len(rows):
                    transform = eval_transform(arch.image_size, arch.normalization)
                    images = torch.stack([transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in rows])
                    out.loc[rows.index, "image_embedding"] = pd.Series(
                        self.model.encode_image(images, normalize=True).tolist(), index=rows.index)
            if "text" in frame:
                rows = frame["text"].dropna()
                if len(rows):
                    tokens = get_tokenizer()(list(rows), arch.context_length)
                    out.loc[rows.index, "text_embedding"] = pd.Series(
                        self.model.encode_text(tokens, normalize=True).tolist(), index=rows.index)
        return out


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema
    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image", required=False), ColSpec("string", "text", required=False)]),
        outputs=Schema([ColSpec(Array("double"), "image_embedding", required=False),
                        ColSpec(Array("double"), "text_embedding", required=False)]))


def log_model(exported: str | Path, name: str = "model") -> str:
    """Log an export as an MLflow Model into the active run; returns its model URI."""
    import mlflow
    import torch
    info = mlflow.pyfunc.log_model(
        # a model from code (pipeline/tracking/mlflow_entry.py), not a cloudpickled object
        name=name, python_model=str(Path(__file__).with_name("mlflow_entry.py")), artifacts={"weights": str(exported)},
        code_paths=[str(REPO_ROOT / "pipeline")], signature=signature(),
        # pinned to what trained it; inferring them would load the model in a subprocess
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "torchvision", "pillow", "pandas",
                          "ftfy", "regex", f"mlflow=={mlflow.__version__}"])
    return info.model_uri
