"""Our linear probe beside CLIP_benchmark's (clip_benchmark.metrics.linear_probe: a torch
linear layer trained with AdamW, its weight decay searched on a validation split), on the
same features and the same splits, in one process: top-1 accuracy and seconds of each.

    python -m bench.bench_linear_probe [--checkpoint runs/<run>/model.pt] \
        [--dataset data/demo/eval/digits] [--seed 0]

Without --checkpoint the features come from msclip-s-tiny at its fixed-seed
initialization (eval mode), which needs nothing but the demo's held-out digits.
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from data_prep.demo import demo_location
from pipeline.cli import command_line


@contextlib.contextmanager
def cuda_calls_stay_on_cpu():
    """CLIP_benchmark's probe hardcodes `.cuda()` on its layer and batches (and asserts
    device == 'cuda': "else too slow"), though nothing in its math needs a GPU. On a
    machine without one, those two methods leave the tensor or module where it is."""
    saved = torch.nn.Module.cuda, torch.Tensor.cuda
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.nn.Module.cuda, torch.Tensor.cuda = saved


def topk_accuracy(output, target, topk=(1,)):
    """clip_benchmark's `accuracy` (metrics/zeroshot_classification.py), which calls
    float() on a one-element array, an error since numpy 2.4: the same count, as .item()."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


class CpuNamedCuda(str):
    """The device string "cpu" for torch (`.to(device)`, autocast), equal to "cuda" for
    CLIP_benchmark's device assert."""

    def __eq__(self, other):
        return other == "cuda" or str.__eq__(self, other)

    __hash__ = str.__hash__


def clip_benchmark_probe(x_fit, y_fit, x_val, y_val, x_test, y_test, seed: int = 0, lr: float = 0.1,
                         epochs: int = 10, batch_size: int = 64) -> dict:
    """CLIP_benchmark's `evaluate` unchanged, with its CLI defaults (lr 0.1, 10 epochs,
    batch 64, normalized features) and our splits: its feature cache is written first
    (L2-normalized, as its Featurizer writes it), so it skips featurizing and fits."""
    from clip_benchmark.metrics import linear_probe as cb
    saved_accuracy, cb.accuracy = cb.accuracy, topk_accuracy
    with tempfile.TemporaryDirectory() as root, cuda_calls_stay_on_cpu():
        feature_dir = Path(root) / "features"
        feature_dir.mkdir()
        for split, x, y in (("train", x_fit, y_fit), ("val", x_val, y_val), ("test", x_test, y_test)):
            torch.save(F.normalize(torch.as_tensor(x, dtype=torch.float32), dim=-1), feature_dir / f"features_{split}.pt")
            torch.save(torch.as_tensor(y, dtype=torch.long), feature_dir / f"targets_{split}.pt")
        try:
            return cb.evaluate(None, None, None, fewshot_k=-1, batch_size=batch_size, num_workers=0, lr=lr,
                               epochs=epochs, model_id="features", seed=seed, feature_root=root,
                               device=CpuNamedCuda("cpu"), val_dataloader=True, normalize=True, amp=False)
        finally:
            cb.accuracy = saved_accuracy


def side_by_side(x_train, y_train, x_test, y_test, seed: int = 0, val_fraction: float = 0.2) -> dict:
    """Both probes on the same features and the same fit/validation/test split."""
    from eval import linear_probe
    started = time.perf_counter()
    ours = linear_probe.probe(x_train, y_train, x_test, y_test, seed, val_fraction)
    ours_s = time.perf_counter() - started
    x_fit, x_val, y_fit, y_val = linear_probe.validation_split(x_train, y_train, val_fraction, seed)
    torch.manual_seed(seed)
    started = time.perf_counter()
    ref = clip_benchmark_probe(x_fit, y_fit, x_val, y_val, x_test, y_test, seed)
    ref_s = time.perf_counter() - started
    return {"ours": ours, "ours_s": ours_s, "clip_benchmark": ref, "clip_benchmark_s": ref_s}


def digit_features(dataset: Path, checkpoint: str | None, seed: int = 0):
    """Pre-projection features of the dataset's train and test splits."""
    from eval.data import image_loader, read_classification
    from eval.features import image_features, model_transform
    if checkpoint:
        from pipeline.weights.export import load_exported
        model = load_exported(checkpoint)[0]
    else:
        from pipeline.model import build_model
        torch.manual_seed(seed)
        model = build_model("msclip-s-tiny")
    model.eval()
    out = []
    for split in ("train", "test"):
        data = read_classification(dataset, split)
        x, y = image_features(model, image_loader(data.images, model_transform(model), 64, 0, data.labels),
                              projected=False, desc=f"features {split}")
        out += [x.numpy(), y.numpy()]
    return out


def main(argv=None) -> dict:
    parser = command_line("python -m bench.bench_linear_probe", __doc__, notes=False)
    parser.add_argument("--checkpoint", help="an export (model.pt); default: msclip-s-tiny at its seeded init")
    parser.add_argument("--dataset", default=str(demo_location() / "eval" / "digits"),
                        help="class folders with train/ and test/ (default: the demo's, MSCLIP_DEMO_DATA)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    x_train, y_train, x_test, y_test = digit_features(Path(args.dataset), args.checkpoint, args.seed)
    result = side_by_side(x_train, y_train, x_test, y_test, args.seed)
    ours, ref = result["ours"], result["clip_benchmark"]
    print(f"features: {x_train.shape[0]} train, {x_test.shape[0]} test, dim {x_train.shape[1]}"
          f" ({args.checkpoint or 'msclip-s-tiny, seeded init'})")
    print(f"{'probe':<16}{'top-1':>8}{'seconds':>9}  chosen")
    print(f"{'ours (L-BFGS)':<16}{ours['lp_acc1']:>8.4f}{result['ours_s']:>9.1f}  lambda={ours['lp_lambda']:.3g} "
          f"({ours['lp_searched']} fits, {ours['lp_unconverged_fits']} unconverged)")
    print(f"{'CLIP_benchmark':<16}{ref['lp_acc1']:>8.4f}{result['clip_benchmark_s']:>9.1f}  "
          f"weight_decay={ref['weight_decay']:.3g}")
    print(f"top-1 ours - CLIP_benchmark: {100 * (ours['lp_acc1'] - ref['lp_acc1']):+.2f} points")
    return result


if __name__ == "__main__":
    main()
