"""Periodic evaluation inside the training loop (`eval.*` in the run config): zero-shot
on one dataset, or a suite (eval/suite.py)."""
from __future__ import annotations

import os

import torch

from eval.data import DatasetMissing, EvalDataError, read_classification
from pipeline.config import ConfigError, EvalConfig
from pipeline.model.heads import heads_for_export, token_heads


def eval_copy(module) -> "torch.nn.Module":
    """An fp32, eval-mode copy of the trainer's encoder (and FILIP's heads, when trained),
    on the module's device; `module` is the trainer's pipeline.objectives.TrainModule, read
    through its encoder and the heads it says evaluation keeps. Built on the meta device
    and loaded by assignment of the cloned weights (the model has no buffer outside its
    state dict): no initialization to compute, no draw from the training RNG, no copy
    between devices."""
    from pipeline.model import build_model
    encoder = module.encoder
    with torch.device("meta"):
        model = build_model(encoder.arch)
    model.load_state_dict({k: v.detach().float().clone() for k, v in encoder.state_dict().items()}, assign=True)
    heads = heads_for_export(module.state_dict(), module.export_heads())
    model.token_heads = token_heads(encoder.arch, {k: v.detach().float().clone() for k, v in heads.items()})
    model.similarity = module.similarity  # a FILIP-only run is measured token-wise, as its export will be
    return model.eval()


class PeriodicZeroShot:
    """Reads the dataset (or every dataset of the suite) at construction, so a bad path
    fails before training starts; a suite's datasets that are not there are listed, one
    line each, and left out."""

    def __init__(self, cfg: EvalConfig, total_steps: int):
        self.cfg, self.total_steps = cfg, total_steps
        self.suite, self.sets = None, []  # sets: (task, dataset name, data, headline metric)
        if cfg.suite:
            self._read_suite(cfg)
            return
        try:
            self.sets.append(("zeroshot_classification", None, read_classification(cfg.dataset, cfg.split), "acc1"))
        except EvalDataError as e:
            raise ConfigError(f"eval.dataset: {e}") from None

    def _read_suite(self, cfg: EvalConfig):
        from eval.runner import read_dataset
        from eval.suite import SuiteError, load_suite, locate
        try:
            self.suite = load_suite(cfg.suite)
        except SuiteError as e:
            raise ConfigError(f"eval.suite: {e}") from None
        speak = os.environ.get("RANK", "0") == "0"  # every rank reads the sets; one says what is missing
        for entry in self.suite.datasets:
            location = locate(entry, cfg.root or None)
            try:
                if location is None:
                    raise DatasetMissing(f"not found under eval.root={cfg.root!r} ({', '.join(entry.paths)})")
                self.sets.append((entry.task, entry.name, read_dataset(entry.task, location, entry.split,
                                                                       entry.train_split), entry.headline))
            except DatasetMissing as e:
                if speak:
                    print(f"[eval] suite {self.suite.name}: {entry.name} skipped, {e}", flush=True)
            except EvalDataError as e:
                raise ConfigError(f"eval.suite: {entry.name}: {e}") from None
        if not self.sets:
            raise ConfigError(f"eval.suite: {self.suite.name}: none of its datasets is under eval.root={cfg.root!r}")

    def due(self, step: int) -> bool:
        return step % self.cfg.every_steps == 0 or step == self.total_steps

    def __call__(self, engine) -> dict:
        """Rank 0 evaluates an fp32 copy of the full model; every rank must call this
        (ZeRO-3 gathers the partitioned parameters collectively)."""
        import deepspeed
        import torch.distributed as dist
        module, rank, model = engine.module, dist.get_rank(), None
        # A no-op for ZeRO-0/1/2, whose module holds full parameters. The copy is needed
        # because ZeRO-3's hooks re-partition parameters used outside a module's forward
        # (encode_text's projection), and it keeps the training module's mode untouched.
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            if rank == 0:
                model = eval_copy(module)
        metrics = {}
        if rank == 0:
            # The eval DataLoader's seed draws from the global generator: keep the training
            # RNG stream, and so exact resume, independent of evaluation.
            with torch.random.fork_rng(devices=[]):
                metrics = self.evaluate(model, str(engine.device))
        dist.barrier()
        return metrics

    def evaluate(self, model, device: str) -> dict[str, float]:
        """Every set's metrics (eval/<task>/<dataset>/<metric>), and a suite's aggregates
        over them (eval/suite/<suite>/<aggregate>)."""
        from eval.runner import evaluate_dataset, mlflow_metrics
        metrics, records = {}, {}
        for task, name, data, headline in self.sets:
            result = evaluate_dataset(model, task, data, self.cfg.batch_size, self.cfg.workers, device)
            name = name or data.name
            metrics.update(mlflow_metrics(task, name, {k: v for k, v in result.items() if isinstance(v, float)}))
            records[name] = {"metric": headline, "metrics": result}
        if self.suite:
            from eval.suite import SUITE_PREFIX, aggregate
            for agg, a in aggregate(self.suite, records).items():
                metrics[f"{SUITE_PREFIX}/{self.suite.name}/{agg}"] = a["value"]
        return metrics
