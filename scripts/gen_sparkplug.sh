#!/usr/bin/env bash
# Regenerate agent/plc/sparkplug_b_pb2.py (+ .pyi for mypy) from agent/plc/sparkplug_b.proto.
#
# protoc is pinned (grpcio-tools 1.75.1 bundles libprotoc 31.1): its output asks the protobuf runtime
# for >= 6.31.1, which is the lower bound of the `sparkplug` extra in pyproject.toml. Moving to another
# protoc means moving that bound with it. grpcio-tools is installed into a throw-away folder (--no-deps:
# only its protoc is used), so the project's own protobuf runtime stays as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
GRPC_TOOLS_VERSION=1.75.1
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
"$PY" -m pip install -q --no-deps --target "$tools" "grpcio-tools==${GRPC_TOOLS_VERSION}"
# The proto is named by its path from the repository root, so the descriptor registered at import is
# "agent/plc/sparkplug_b.proto" and cannot collide with another library's "sparkplug_b.proto".
PYTHONPATH="$tools" "$PY" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. agent/plc/sparkplug_b.proto
for f in agent/plc/sparkplug_b_pb2.py agent/plc/sparkplug_b_pb2.pyi; do
  # generated code: exempt from the project's lint rules
  { echo "# ruff: noqa"; cat "$f"; } > "$f.tmp" && mv "$f.tmp" "$f"
done
"$PY" - <<'PY'
from agent.plc import sparkplug_b_pb2 as pb
p = pb.Payload(seq=1)
assert pb.Payload.FromString(p.SerializeToString()).seq == 1
print("agent/plc/sparkplug_b_pb2.py regenerated and imports")
PY
