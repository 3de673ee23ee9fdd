#!/usr/bin/env bash
# Install edge-agent as a systemd service (idempotent: run it again to upgrade).
#
#   sudo scripts/install.sh [--dry-run] [--no-start] [--extra EXTRA] [--python PY]
#
# - a system user `edge-agent` in the groups video and render (created if missing);
# - a venv in /opt/edge-agent/venv. On a Jetson it sees the system site-packages
#   (--system-site-packages) so JetPack's OpenCV (with GStreamer), TensorRT and NVIDIA's
#   onnxruntime-gpu wheel are used as installed, and the project is installed with the `jetson`
#   extra (which pulls none of them, only cuda-python: JetPack has no CUDA Python bindings, and the
#   TensorRT backend needs them), pinned to the device's CUDA minor (/usr/local/cuda/version.json:
#   12.2 on JetPack 6.0, 12.6 on 6.1 / 6.2); elsewhere with the `cpu` extra (pip's onnxruntime + OpenCV);
# - /etc/edge-agent/agent.yaml from config/agent.yaml, only if there is none yet;
# - /etc/systemd/system/edge-agent.service, daemon-reload, enable, (re)start.
# When systemd is not running (a chroot, an image build) the unit is enabled but not started.
# --dry-run prints every command instead of running it.
set -euo pipefail

PREFIX=/opt/edge-agent
VENV="$PREFIX/venv"
ETC=/etc/edge-agent
UNIT_DIR=/etc/systemd/system
USER_NAME=edge-agent
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

dry_run=0
start=1
extra=""
python=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --no-start) start=0 ;;
    --extra) extra="$2"; shift ;;
    --python) python="$2"; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

run() {
  # Print each command; run it unless --dry-run.
  printf '+ %s\n' "$*"
  if [ "$dry_run" = 0 ]; then "$@"; fi
}

is_jetson() {
  [ -f /etc/nv_tegra_release ] || grep -qs 'nvidia,tegra' /proc/device-tree/compatible
}

if [ "$dry_run" = 0 ] && [ "$(id -u)" != 0 ]; then
  echo "install.sh: run as root (sudo), or with --dry-run to see what it would do" >&2
  exit 1
fi

if is_jetson; then
  platform=jetson
  : "${extra:=jetson}"
  : "${python:=/usr/bin/python3}"   # JetPack's Python 3.10, whose site-packages hold cv2 / tensorrt
  venv_opts=(--system-site-packages)
else
  platform=generic
  : "${extra:=cpu}"
  : "${python:=python3}"
  venv_opts=()
fi
echo "== edge-agent install: platform $platform, extra [$extra], python $python, source $SRC"
"$python" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' 2>/dev/null || {
  echo "install.sh: $python is missing or older than 3.10" >&2; exit 1; }
"$python" -c 'import venv, ensurepip' 2>/dev/null || {
  echo "install.sh: $python has no venv/ensurepip module (apt-get install python3-venv)" >&2; exit 1; }

echo "== groups and user"
for g in video render; do
  getent group "$g" >/dev/null || run groupadd --system "$g"
done
if id "$USER_NAME" >/dev/null 2>&1; then
  run usermod --append --groups video,render "$USER_NAME"
else
  run useradd --system --user-group --groups video,render --home-dir /var/lib/edge-agent --no-create-home \
    --shell /usr/sbin/nologin --comment "edge-agent service" "$USER_NAME"
fi

echo "== venv $VENV"
run install -d -m 0755 "$PREFIX"
if [ ! -x "$VENV/bin/python" ]; then
  run "$python" -m venv "${venv_opts[@]}" "$VENV"
fi
# Build from a clean copy: the source may be read-only (a bind mount), and setuptools writes
# egg-info / build folders into the tree it builds.
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
run tar -C "$SRC" --exclude=.git --exclude=.venv --exclude='*.egg-info' --exclude=build --exclude=__pycache__ \
  -cf "$stage/src.tar" pyproject.toml README.md agent config systemd
run mkdir -p "$stage/src"
run tar -C "$stage/src" -xf "$stage/src.tar"
constraint=()
if [ "$platform" = jetson ]; then
  # cuda-python of the device's own CUDA minor (the jetson extra allows >=12.2,<13)
  cuda_mm="$("$python" -c 'import json; v = json.load(open("/usr/local/cuda/version.json"))["cuda"]["version"]
print(".".join(v.split(".")[:2]))' 2>/dev/null || true)"
  if [ -n "$cuda_mm" ]; then
    echo "cuda-python==$cuda_mm.*" > "$stage/constraints.txt"
    constraint=(--constraint "$stage/constraints.txt")
    echo "   system CUDA $cuda_mm: cuda-python==$cuda_mm.*"
  else
    echo "note: /usr/local/cuda/version.json unreadable: cuda-python is not pinned to this device's CUDA"
  fi
fi
run "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${constraint[@]}" "$stage/src[$extra]"
if [ "$platform" = jetson ]; then
  "$VENV/bin/python" -c 'from agent.engines.tensorrt import tensorrt_available as t; import sys; sys.exit(t() is None)' \
    2>/dev/null || echo "note: TensorRT's Python bindings are not importable: apt-get install python3-libnvinfer" \
    "(JetPack's TensorRT; never a pip tensorrt wheel on a Jetson). engine.backend: tensorrt needs them."
  "$VENV/bin/python" -c 'from agent.engines.cuda import cuda_runtime; cuda_runtime()' 2>/dev/null \
    || echo "note: the CUDA Python bindings do not import in $VENV: pip install 'cuda-python>=12.2,<13'."
  "$VENV/bin/python" -c 'import onnxruntime' 2>/dev/null || echo "note: onnxruntime-gpu for Jetson is not on" \
    "the package index: install NVIDIA's wheel for JetPack 6 (https://pypi.jetson-ai-lab.dev, or the" \
    "Jetson Zoo) into $VENV, or use engine.backend: tensorrt, which needs only JetPack's TensorRT."
  "$VENV/bin/python" -c 'import cv2' 2>/dev/null || echo "note: JetPack's OpenCV is not importable:" \
    "apt-get install python3-opencv (never pip's opencv-python on a Jetson: it has no GStreamer)."
fi
run install -m 0644 "$SRC/README.md" "$PREFIX/README.md"

echo "== config $ETC"
# root-owned, readable by the service's group only (it may hold broker settings); never writable by it.
run install -d -m 0750 -g "$USER_NAME" "$ETC"
if [ -e "$ETC/agent.yaml" ]; then
  echo "   $ETC/agent.yaml exists: kept (compare with $SRC/config/agent.yaml after upgrades)"
else
  # The example config points at the bundled demo model with relative paths: rewrite them to the
  # installed package's data folder, and the cache / models to the unit's directories.
  data="$("$VENV/bin/python" -c 'import agent.config as c; print(c.DATA_DIR)' 2>/dev/null || echo /opt/edge-agent/data)"
  run install -m 0640 -g "$USER_NAME" "$SRC/config/agent.yaml" "$ETC/agent.yaml"
  run sed -i "s#\.\./agent/data#$data#g" "$ETC/agent.yaml"
fi

echo "== systemd unit"
run install -m 0644 "$SRC/systemd/edge-agent.service" "$UNIT_DIR/edge-agent.service"
if [ -d /run/systemd/system ]; then
  run systemctl daemon-reload
  run systemctl enable edge-agent.service
  if [ "$start" = 1 ]; then
    # restart, not `enable --now`: an upgrade must replace the running process.
    run systemctl restart edge-agent.service
    echo "   status: systemctl status edge-agent; logs: journalctl -u edge-agent -f"
  fi
else
  echo "   systemd is not running here: the unit is enabled for the next boot, not started"
  run systemctl enable edge-agent.service
fi
echo "== done"
