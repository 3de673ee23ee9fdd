#!/usr/bin/env python3
"""Print this machine's CPUs split in two halves by physical core (lscpu): "AGENT_CPUS SERVER_CPUS",
comma-separated lists for taskset, so an agent and its RTSP test server run on cores of their own
(the measurement folders' run.sh: `read -r AG SV < <(python3 scripts/split_cores.py)`)."""

from __future__ import annotations

import subprocess


def main() -> None:
    out = subprocess.run(["lscpu", "-p=CPU,CORE"], capture_output=True, text=True, check=True).stdout
    rows = [line.split(",") for line in out.splitlines() if not line.startswith("#")]
    cores = sorted({int(core) for _, core in rows})
    half = set(cores[:len(cores) // 2])
    print(",".join(cpu for cpu, core in rows if int(core) in half),
          ",".join(cpu for cpu, core in rows if int(core) not in half))


if __name__ == "__main__":
    main()
