# Sourced after launch/env.sh where the Spark path is used (`data_prep.shard --distributor
# pyspark` on a local Spark session; tests/run.sh does, for its one Spark test): a headless
# Java 17 runtime from apt when no `java` is on PATH, and requirements-spark.txt into .venv.
# Inside a cluster's own Spark environment none of this is needed: see the README.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! command -v java >/dev/null 2>&1; then
  echo "[setup] installing a headless Java runtime for Spark (apt)"
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq openjdk-17-jre-headless >/dev/null
fi
if ! "$REPO_ROOT/.venv/bin/python" -m pip install -q -r "$REPO_ROOT/requirements-spark.txt" \
    2> >(grep -v "^WARNING: Location" >&2); then
  echo "[setup] could not install requirements-spark.txt"; exit 1
fi
