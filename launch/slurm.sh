#!/usr/bin/env bash
# SLURM: one task per GPU, started by srun; launch/train.py maps SLURM_PROCID /
# SLURM_NTASKS / SLURM_LOCALID to RANK / WORLD_SIZE / LOCAL_RANK itself.
#
#   sbatch --nodes=4 launch/slurm.sh ds_configs/zero2_bf16.json launch/recipes/msclip-s-b32-yfcc.yaml [key=value ...]
#
#SBATCH --job-name=msclip
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=72:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
DS_CONFIG=${1:?usage: sbatch launch/slurm.sh DS_CONFIG RUN_YAML [overrides]}
RUN_YAML=${2:?usage: sbatch launch/slurm.sh DS_CONFIG RUN_YAML [overrides]}
shift 2
cd "${SLURM_SUBMIT_DIR}"
source .venv/bin/activate
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-29500}
# Every rank resumes from the newest complete checkpoint if the job is requeued, on whatever
# the new allocation is: another number of nodes converts the checkpoint once (DeepSpeed's
# universal checkpoint) and the data order goes on unchanged, as long as the new world size
# divides data.readers (docs/training.md, "Changing the number of GPUs mid-run").
srun --kill-on-bad-exit=1 python launch/train.py --deepspeed_config "$DS_CONFIG" --config "$RUN_YAML" \
    train.resume=latest "$@"
