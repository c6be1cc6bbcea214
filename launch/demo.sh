#!/usr/bin/env bash
# The README's main command. Installs what it needs into .venv, then runs the flow.
# Today the flow is the part that has landed: the model family and its parameter
# table (CLIP baseline vs MS-CLIP variants, tiny and B-sized). Data, training,
# evaluation and MLflow join as their issues land.
source "$(dirname "$0")/env.sh"
echo "== model family: parameters per variant (shared = used by both towers) =="
python -m pipeline.model clip-tiny msclip-tiny msclip-s-tiny
python -m pipeline.model clip-b32 msclip-b32 msclip-es-b32 msclip-s-b32 msclip-s-b16
