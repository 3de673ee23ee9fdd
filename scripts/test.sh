#!/usr/bin/env bash
# The project's test command (README): installs what the tests need, then runs pytest.
# Usage: scripts/test.sh [pytest args...]     PYTHON=python3.10 scripts/test.sh  for another interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "mosquitto missing: installing Debian's package (the tests start their own broker)"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq mosquitto >/dev/null
  else sudo apt-get update -qq && sudo apt-get install -y -qq mosquitto >/dev/null; fi
fi
"$PY" -m pip install -q -e '.[cpu,test,metrics]'
exec "$PY" -m pytest "$@"
