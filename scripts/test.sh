#!/usr/bin/env bash
# The project's test command (README): makes (or reuses) the project's venv, installs the project
# with its test extras there, then runs pytest from it. Never installs into the system interpreter
# (Debian / Ubuntu refuse that: PEP 668), and works from a new shell with only python3 and
# python3-venv. Installs Debian's mosquitto when it is missing (the tests start their own broker).
#
# Usage: scripts/test.sh [pytest args...]
#   PYTHON=python3.10 scripts/test.sh   another interpreter: its own venv, .venv-3.10
#   PYTHON=/path/venv/bin/python ...    an interpreter already in a venv is used as it is
#   VENV=DIR scripts/test.sh            the venv's folder (default .venv, or .venv-X.Y with PYTHON)
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "mosquitto missing: installing Debian's package (the tests start their own broker)"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq mosquitto >/dev/null
  else sudo apt-get update -qq && sudo apt-get install -y -qq mosquitto >/dev/null; fi
fi

base=${PYTHON:-python3}
if ! command -v "$base" >/dev/null 2>&1; then
  echo "scripts/test.sh: no interpreter '$base' (set PYTHON=...)" >&2
  exit 2
fi
in_venv=$("$base" -c 'import sys; print(int(sys.prefix != sys.base_prefix))')
if [ "$in_venv" = 1 ]; then
  py=$(command -v "$base")
  PATH="$(dirname "$py"):$PATH"  # its console scripts (edge-agent) first, as in an activated venv
else
  ver=$("$base" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  venv=${VENV:-$([ -n "${PYTHON:-}" ] && echo ".venv-$ver" || echo .venv)}
  # a venv left by another Python version (or half made) is made again
  if [ -x "$venv/bin/python" ] && [ "$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' \
      2>/dev/null || true)" != "$ver" ]; then
    echo "scripts/test.sh: $venv is not a Python $ver venv: making it again"
    rm -rf "$venv"
  fi
  if [ ! -x "$venv/bin/python" ]; then
    echo "scripts/test.sh: making the venv $venv with $("$base" --version 2>&1)"
    if ! "$base" -m venv "$venv"; then
      rm -rf "$venv"
      echo "scripts/test.sh: '$base -m venv' failed; on Debian / Ubuntu: sudo apt-get install python3-venv" >&2
      exit 2
    fi
  fi
  py=$venv/bin/python
  # the venv's console scripts (edge-agent) first on PATH, as after `. .venv/bin/activate`
  PATH="$(cd "$venv/bin" && pwd):$PATH"
  export PATH VIRTUAL_ENV="$(cd "$venv" && pwd)"
fi

# everything the tests use goes into this venv (CI's installs into its own python3 do not reach it):
# the extras, and tensorrt-stubs (type stubs only, no dependencies) for the fake-TensorRT test
"$py" -m pip install -q -e '.[cpu,test,metrics,counting,sparkplug]'
# the tracker for zones and counting lines: --no-deps, as on a Jetson (their wheels would pull
# opencv-python, which shadows JetPack's GStreamer OpenCV, and PyAV): the `counting` extra has what they import
"$py" -m pip install -q --no-deps 'trackers>=2.6,<3' 'supervision>=0.26.1'
"$py" -m pip install -q --no-deps tensorrt-stubs \
  || echo "scripts/test.sh: tensorrt-stubs not installed: the fake-TensorRT conformance test says so"
exec "$py" -m pytest "$@"
