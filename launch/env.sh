# Sourced by the README's commands (launch/demo.sh, tests/run.sh, bench/gpu.sh): make sure
# .venv exists and holds requirements.txt (re-installed only when requirements.txt or
# pyproject.toml changed: a stamp of their hash sits in .venv), then put .venv/bin first on
# PATH and change into the checkout. Sourced, it leaves the caller's shell options as they
# were (no `set -e` imposed) and fails with `return 1` and one line saying what is missing.
_msclip_setup() {
  local root venv python_bin stamp want
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  venv="$root/.venv"
  python_bin="${PYTHON_BIN:-python3}"
  if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating $venv"
    "$python_bin" -m venv "$venv" || { echo "[setup] $python_bin -m venv failed (is python3-venv installed?)" >&2; return 1; }
  fi
  stamp="$venv/.requirements.sha256"
  want="$(cat "$root/requirements.txt" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
  [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && return 0
  # DeepSpeed builds its CPU ops (shared-memory allreduce, fused Adam) with the system's
  # C++ compiler; without one every multi-process CPU run fails at its first collective.
  if ! command -v c++ >/dev/null 2>&1 && ! command -v g++ >/dev/null 2>&1; then
    echo "[setup] no C++ compiler (c++/g++): DeepSpeed's CPU ops need one (Debian/Ubuntu: apt-get install g++)" >&2
    return 1
  fi
  echo "[setup] installing requirements.txt into $venv (first time: a few minutes)"
  # The local package mirrors make pip print a warning per package it does not hold.
  "$venv/bin/python" -m pip install -q -r "$root/requirements.txt" 2> >(grep -v "^WARNING: Location" >&2) \
    || { echo "[setup] pip could not install requirements.txt (see above)" >&2; return 1; }
  NO_ALBUMENTATIONS_UPDATE=1 "$venv/bin/python" -c "import torch, deepspeed, open_clip, mlflow, img2dataset, webdataset" \
    || { echo "[setup] the install is incomplete: see the pip output above" >&2; return 1; }
  # DeepSpeed JIT-compiles its CPU ops on first use (a minute or two each). Built now, as
  # part of the install, so that the first run does not pay for it; a failed build shows.
  echo "[setup] compiling DeepSpeed's CPU ops (once)"
  "$venv/bin/python" - <<'PY' || { echo "[setup] DeepSpeed's CPU ops did not build (see above)" >&2; return 1; }
from deepspeed.accelerator import get_accelerator
for name in ("ShareMemCommBuilder", "FusedAdamBuilder"):
    builder = get_accelerator().create_op_builder(name)
    if builder is not None:
        builder.load(verbose=False)
        print(f"[setup] {builder.NAME} built")
PY
  # The project itself, editable (pyproject.toml): every process imports it from this checkout.
  "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$root" 2> >(grep -v "^WARNING: Location" >&2) \
    || { echo "[setup] could not install the project itself (pip install -e)" >&2; return 1; }
  echo "$want" > "$stamp"
}
if ! _msclip_setup; then
  unset -f _msclip_setup
  return 1 2>/dev/null || exit 1
fi
unset -f _msclip_setup
# img2dataset imports albumentations, which otherwise phones home for updates on import.
export NO_ALBUMENTATIONS_UPDATE=1
export PATH="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin:$PATH"
cd "$(dirname "${BASH_SOURCE[0]}")/.." || return 1
