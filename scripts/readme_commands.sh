#!/usr/bin/env bash
# CI check: the README's two first-contact commands, as written, from a new shell (`env -i`) on the
# system python3 (Debian's, with its PEP 668 marker), in a fresh copy of the tree.
#   1. the demo command, end to end on the bundled model and video;
#   2. the test command (scripts/test.sh), with a small pytest selection appended (the full suite
#      runs elsewhere in CI), which exercises its venv setup path.
# Fails when a command fails, prints a traceback, installs into the system interpreter, or when the
# README no longer holds the commands in the form this check reads.
#
# Usage: scripts/readme_commands.sh [pytest args for the test command; default: -q tests/test_cli.py]
# (CI passes a smaller selection: the whole suite has run before it)
set -euo pipefail
cd "$(dirname "$0")/.."
SYSTEM_PY=/usr/bin/python3
SHELL_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin  # a new login shell's, no pyenv

# the first ```sh block after the README line that names it
block() {
  awk -v key="$1" 'index($0, key) { found = 1; next }
                   found && /^```sh$/ { inside = 1; next }
                   inside && /^```$/ { exit }
                   inside { print }' README.md
}
demo_cmd=$(block "**Run the demo**")
test_cmd=$(block "**Run the tests**")
if [ -z "$demo_cmd" ] || [ -z "$test_cmd" ]; then
  echo "README: no \`\`\`sh block after **Run the demo** / **Run the tests**" >&2
  exit 1
fi

if ! "$SYSTEM_PY" -c 'import ensurepip, venv' 2>/dev/null; then
  echo "installing python3-venv (what the README asks for)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
fi

fresh=$(mktemp -d)/edge-agent
mkdir -p "$fresh"
trap 'rm -rf "$(dirname "$fresh")"' EXIT
# what a clone holds: tracked files and new ones not ignored (no .venv, no build output)
git ls-files -z --cached --others --exclude-standard \
  | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$fresh"

in_new_shell() {
  env -i HOME="$HOME" PATH="$SHELL_PATH" LANG=C.UTF-8 TERM=dumb bash --noprofile --norc -c "cd '$fresh' && $1"
}
echo "python3 in a new shell: $(in_new_shell 'command -v python3') ($(in_new_shell 'python3 --version'))"
system_site=$("$SYSTEM_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
before=$(ls "$system_site" 2>/dev/null | sort | md5sum)

echo "== README demo command: $demo_cmd"
t0=$(date +%s)
in_new_shell "$demo_cmd" >"$fresh/demo.out" 2>"$fresh/demo.err" || {
  echo "FAILED (exit $?)"; tail -20 "$fresh/demo.err"; exit 1; }
lines=$(grep -c '"detections"' "$fresh/demo.out" || true)
echo "   $lines detections lines, $(( $(date +%s) - t0 )) s; $(grep '^summary:' "$fresh/demo.err" || echo 'no summary')"
if [ "$lines" -lt 80 ] || grep -q Traceback "$fresh/demo.err"; then
  echo "FAILED: expected >= 80 detections lines (90-frame clip) and no traceback" >&2
  tail -20 "$fresh/demo.err" >&2
  exit 1
fi

args=("$@")
[ ${#args[@]} -gt 0 ] || args=(-q tests/test_cli.py)
quoted=$(printf ' %q' "${args[@]}")
echo "== README test command: $test_cmd$quoted"
t0=$(date +%s)
in_new_shell "$test_cmd$quoted" || { echo "FAILED: the README's test command" >&2; exit 1; }
echo "   $(( $(date +%s) - t0 )) s"
[ -x "$fresh/.venv/bin/edge-agent" ] || { echo "FAILED: no project venv (.venv) was made" >&2; exit 1; }
if [ "$(ls "$system_site" 2>/dev/null | sort | md5sum)" != "$before" ]; then
  echo "FAILED: the system interpreter's site-packages ($system_site) changed" >&2
  exit 1
fi
echo "README commands: ok"
