"""Entry points: train.py (under deepspeed, torchrun or srun), demo.py, the sweep and SLURM scripts."""
