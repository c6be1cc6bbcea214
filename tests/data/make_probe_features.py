"""Writes tests/data/probe_features.npz, the linear probe's fixed features (issue 23): a
probe test must not depend on a model trained on the machine that runs it.

    python tests/data/make_probe_features.py [--output tests/data/probe_features.npz]

Builds the demo data and trains msclip-s-tiny exactly as the test session does
(conftest.demo_data, conftest.train_demo_model), then keeps, for a stratified subset of
the held-out digits (50 per class from train, 30 per class from test, to keep the file
small), in float16:
  x_train, x_test      pre-projection image features (what the probe fits)
  y_train, y_test      labels
  zeroshot_test        the test images' L2-normalized joint-space features
  zeroshot_weights     the zero-shot classifier (per class, the mean prompt embedding)
Rerun it only to change the fixture; the tests read the committed file.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS.parent), str(TESTS)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(TESTS / "data" / "probe_features.npz"))
    args = parser.parse_args()
    from conftest import train_demo_model
    from data_prep.demo import build
    from eval.data import image_loader, read_classification
    from eval.features import image_features, model_transform, zeroshot_weights
    from pipeline.weights.export import load_exported

    with tempfile.TemporaryDirectory() as tmp:
        demo = Path(tmp) / "demo"
        build(str(demo), image_size=64, renders=1, crops_per_photo=20, samples_per_shard=250, seed=0)
        model = load_exported(train_demo_model(demo, Path(tmp) / "model.pt"))[0]
        digits = demo / "eval" / "digits"
        rng = np.random.default_rng(0)
        out = {}
        for split, per_class in (("train", 50), ("test", 30)):
            data = read_classification(digits, split)
            labels = np.asarray(data.labels)
            keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class]
                                           for c in range(len(data.classnames))]))
            loader = image_loader([data.images[i] for i in keep], model_transform(model), 64, 0, labels[keep].tolist())
            x, y = image_features(model, loader, projected=False)
            out[f"x_{split}"], out[f"y_{split}"] = x.numpy().astype(np.float16), y.numpy().astype(np.int8)
            if split == "test":
                joint, _ = image_features(model, loader, projected=True)
                out["zeroshot_test"] = joint.numpy().astype(np.float16)
                out["zeroshot_weights"] = zeroshot_weights(model, data.classnames, data.templates).numpy().astype(
                    np.float16)
    np.savez_compressed(args.output, **out)
    print(f"wrote {args.output}: " + ", ".join(f"{k} {v.shape}" for k, v in out.items()))


if __name__ == "__main__":
    main()
