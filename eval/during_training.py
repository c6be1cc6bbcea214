"""Periodic zero-shot evaluation inside the training loop (`eval.*` in the run config)."""
from __future__ import annotations

import torch

from eval import zeroshot
from eval.data import EvalDataError, read_classification
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
    """Reads the dataset at construction, so a bad path fails before training starts."""

    def __init__(self, cfg: EvalConfig, total_steps: int):
        self.cfg, self.total_steps = cfg, total_steps
        try:
            self.data = read_classification(cfg.dataset, cfg.split)
        except EvalDataError as e:
            raise ConfigError(f"eval.dataset: {e}") from None

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
                result = zeroshot.evaluate(model, self.data, self.cfg.batch_size, self.cfg.workers, str(engine.device))
            metrics = {f"eval/zeroshot/{self.data.name}/{k}": v for k, v in result.items() if isinstance(v, float)}
        dist.barrier()
        return metrics
