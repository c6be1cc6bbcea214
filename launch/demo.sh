#!/usr/bin/env bash
# The README's main command: installs what it needs into .venv, then runs the whole flow
# on CPU (launch/demo.py: demo shards -> deepspeed training of clip-tiny and msclip-s-tiny
# -> eval -> MLflow comparison). Arguments go to launch/demo.py (--steps, --workdir, ...).
source "$(dirname "$0")/env.sh" || exit 1
exec python launch/demo.py "$@"
