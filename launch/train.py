"""Training entry point.

    deepspeed [--hostfile H | --num_gpus N | --num_nodes ...] launch/train.py \
        --deepspeed_config ds_configs/zero2_bf16.json --config launch/recipes/X.yaml [key.sub=value ...]

Also runs under torchrun (it reads RANK / WORLD_SIZE / LOCAL_RANK) and SLURM srun
(SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, see launch/slurm.sh). Everything that can
be wrong with the inputs (config keys, batch arithmetic, DeepSpeed JSON, shards) fails
before the process group starts.
"""
from __future__ import annotations

import logging
import os
import sys

from pipeline.cli import command_line
from pipeline.config import ConfigError
from pipeline.train.preflight import check_run


def parse_args(argv=None):
    parser = command_line("deepspeed launch/train.py", __doc__, notes=False)
    parser.add_argument("--deepspeed_config", required=True, help="ds_configs/*.json (DeepSpeed knobs only)")
    parser.add_argument("--config", help="run YAML (launch/recipes/*.yaml)")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the run config")
    return parser.parse_args(argv)


def adopt_slurm_env():
    """Under `srun`, map SLURM's variables to the ones torch.distributed reads."""
    if "SLURM_PROCID" in os.environ and "RANK" not in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ["SLURM_LOCALID"]


def validate(args):
    """Every input check, before any process group exists: first those that need no torch
    (pipeline/train/preflight.py: a bad config fails in a fraction of a second), then those
    that do (pipeline.train.trainer.prepare, and the evaluation set's contents). Returns the
    run's plan, its evaluation during training (or None) and model.init_from's (weights,
    key report) (or None)."""
    plan = check_run(args.config, args.overrides, args.deepspeed_config)
    from pipeline.train.trainer import prepare
    initial = prepare(plan, args.deepspeed_config)
    evaluator = None
    if plan.cfg.eval.every_steps:  # the application's evaluation, handed to the library's trainer
        from eval.during_training import PeriodicZeroShot
        evaluator = PeriodicZeroShot(plan.cfg.eval, plan.cfg.train.steps)
    return plan, evaluator, initial


def main(argv=None):
    args = parse_args(argv)  # first (it redacts the output): the logging handler below writes to the redacting stderr
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    adopt_slurm_env()
    try:
        plan, evaluator, initial = validate(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pipeline.train.trainer import run
    return run(plan, evaluator, initial)


if __name__ == "__main__":
    sys.exit(main())
