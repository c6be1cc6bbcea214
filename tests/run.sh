#!/usr/bin/env bash
# The README's test command: installs what it needs, then runs the whole suite
# (slow end-to-end tests included). Extra arguments go to pytest.
source "$(dirname "$0")/../launch/env.sh" || exit 1
source "$(dirname "$0")/../launch/env_spark.sh" || exit 1  # the one Spark test (tests/test_data_prep.py)
python -m pytest tests "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "ERROR: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
