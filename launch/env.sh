# Sourced by the README's commands: make sure .venv exists and holds requirements.txt.
# Re-installs only when requirements.txt changed (a stamp of its hash sits in .venv).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
PYTHON_BIN="${PYTHON_BIN:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON_BIN" -m venv "$VENV"
fi
stamp="$VENV/.requirements.sha256"
want="$(cat "$REPO_ROOT/requirements.txt" "$REPO_ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing requirements.txt into $VENV (first time: a few minutes)"
  # The local package mirrors make pip print a warning per package it does not hold.
  "$VENV/bin/python" -m pip install -q -r "$REPO_ROOT/requirements.txt" 2> >(grep -v "^WARNING: Location" >&2)
  NO_ALBUMENTATIONS_UPDATE=1 "$VENV/bin/python" -c "import torch, deepspeed, open_clip, mlflow, img2dataset, webdataset" \
    || { echo "[setup] the install is incomplete: see the pip output above"; exit 1; }
  # DeepSpeed JIT-compiles its CPU ops on first use (a minute or two each): its shared-
  # memory allreduce (every multi-process CPU run) and fused Adam (cpu_bf16). Build them
  # now, as part of the install, so that the first run does not pay for it.
  echo "[setup] compiling DeepSpeed's CPU ops (once)"
  "$VENV/bin/python" - <<'PY' 2>&1 | grep -E "built successfully|Error" || true
from deepspeed.accelerator import get_accelerator
for name in ("ShareMemCommBuilder", "FusedAdamBuilder"):
    builder = get_accelerator().create_op_builder(name)
    if builder is not None:
        builder.load()
        print(f"{builder.NAME} built successfully")
PY
  # The project itself, editable (pyproject.toml): every process imports it from this checkout.
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$REPO_ROOT" 2> >(grep -v "^WARNING: Location" >&2)
  echo "$want" > "$stamp"
fi
# img2dataset imports albumentations, which otherwise phones home for updates on import.
export NO_ALBUMENTATIONS_UPDATE=1
export PATH="$VENV/bin:$PATH"
cd "$REPO_ROOT"
