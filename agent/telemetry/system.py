"""System readings for telemetry: process, host, disks, and the GPU / SoC where the device exposes them.

Sources, each optional: psutil (else /proc), NVML through `pynvml` (nvidia-ml-py) on discrete GPUs,
and on Jetson the sysfs nodes (GPU load, thermal zones, INA3221 power rails, EMC clock) or one
`tegrastats` line (`parse_tegrastats`). A reading that the device does not expose is absent from
the result, never reported as 0.

`check_thresholds` turns readings into events (temperature high, disk low, fps low) with hysteresis:
one event when a limit is crossed, one ``*_cleared`` event when the reading is back.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from agent.config import TelemetryConfig

log = logging.getLogger(__name__)

__all__ = ["SystemReader", "Thresholds", "check_thresholds", "parse_tegrastats"]

_MB = 1024 * 1024

# Jetson GPU load (per mille) by SoC / L4T release; the first that exists is used.
GPU_LOAD_NODES = (
    "sys/devices/platform/gpu.0/load",  # Xavier, Nano (L4T 32 / 35)
    "sys/devices/gpu.0/load",  # Nano / TX (L4T 32)
    "sys/devices/platform/17000000.gpu/load",  # Orin (L4T 36)
    "sys/devices/platform/bus@0/17000000.gpu/load",  # Orin (L4T 36, bus@0 device tree)
    "sys/devices/platform/17000000.ga10b/load",  # Orin (L4T 35)
    "sys/devices/17000000.ga10b/load",
)
# EMC (memory controller) clock in Hz: debugfs, readable by root only; absent under the hardened unit.
EMC_RATE_NODES = (
    "sys/kernel/debug/bpmp/debug/clk/emc/rate",
    "sys/kernel/debug/clk/emc/clk_rate",
)
# INA3221 power monitors (Jetson carrier / module rails), as hwmon: in<N>_label, in<N>_input (mV),
# curr<N>_input (mA).
INA3221_HWMON_GLOBS = (
    "sys/bus/i2c/drivers/ina3221*/*/hwmon/hwmon*",
    "sys/bus/i2c/drivers/ina3221*/*/*/hwmon/hwmon*",
)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except (OSError, ValueError):
        return None


def _read_int(path: Path) -> int | None:
    text = _read_text(path)
    if text is None:
        return None
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return None


class _ProcCpu:
    """CPU percent of this process (of one core, like top) and of the whole host, from /proc."""

    def __init__(self, proc: Path) -> None:
        self.proc = proc
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last: tuple[float, float, float, float] | None = self._sample()

    def _sample(self) -> tuple[float, float, float, float] | None:
        stat = _read_text(self.proc / "self" / "stat")
        host = _read_text(self.proc / "stat")
        if stat is None or host is None:
            return None
        fields = stat.rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
        proc_s = (int(fields[11]) + int(fields[12])) / self.tick  # utime + stime
        cpu = [int(x) for x in host.splitlines()[0].split()[1:]]
        idle = cpu[3] + (cpu[4] if len(cpu) > 4 else 0)  # idle + iowait
        return time.monotonic(), proc_s, float(sum(cpu[:8])), float(idle)

    def read(self) -> dict[str, float]:
        now = self._sample()
        last, self._last = self._last, now
        if now is None or last is None:
            return {}
        out: dict[str, float] = {}
        wall = now[0] - last[0]
        if wall > 0:
            out["process"] = round(100.0 * (now[1] - last[1]) / wall, 1)
        total = now[2] - last[2]
        if total > 0:
            out["system"] = round(100.0 * (1.0 - (now[3] - last[3]) / total), 1)
        return out


class _Nvml:
    """Device 0 through NVML; disabled for good after the first failure (no driver, no library)."""

    def __init__(self) -> None:
        self.mod: Any = None
        self.handle: Any = None
        self.failed = False

    def read(self) -> dict[str, Any]:
        if self.failed:
            return {}
        if self.mod is None:
            try:
                self.mod = importlib.import_module("pynvml")
                self.mod.nvmlInit()
                self.handle = self.mod.nvmlDeviceGetHandleByIndex(0)
            except Exception as exc:  # ImportError, NVMLError (no driver / no device)
                log.debug("NVML unavailable: %s", exc)
                self.failed = True
                return {}
        nv, h = self.mod, self.handle
        out: dict[str, Any] = {}

        def get(key: str, fn: Any) -> None:
            try:
                value = fn()
            except Exception:  # NVMLError_NotSupported and friends: the reading stays absent
                return
            if value is not None:
                out[key] = value

        get("name", lambda: _str(nv.nvmlDeviceGetName(h)))
        get("util_percent", lambda: float(nv.nvmlDeviceGetUtilizationRates(h).gpu))
        mem = None
        try:
            mem = nv.nvmlDeviceGetMemoryInfo(h)
        except Exception:
            pass
        if mem is not None:
            out["mem_used_mb"] = round(mem.used / _MB, 1)
            out["mem_total_mb"] = round(mem.total / _MB, 1)
        get("temperature_c", lambda: float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)))
        get("power_w", lambda: round(nv.nvmlDeviceGetPowerUsage(h) / 1000.0, 2))
        get("sm_clock_mhz", lambda: float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)))
        return out


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SystemReader:
    """Reads process, host, disk and GPU / SoC figures; `root` is where /sys is looked up (tests).

    `paths_to_watch` are folders whose file system's free space is reported (the nearest existing
    parent when a folder does not exist yet). `nvml` False skips NVML; None tries it lazily.
    """

    def __init__(self, paths_to_watch: list[Path], *, root: Path = Path("/"), proc: Path = Path("/proc"),
                 nvml: bool | None = None, use_psutil: bool | None = None) -> None:
        self.paths = [Path(p) for p in paths_to_watch]
        self.root = Path(root)
        self.proc = Path(proc)
        self._nvml = _Nvml() if nvml is not False else None
        self._psutil: Any = None
        if use_psutil is not False:
            try:
                psutil = importlib.import_module("psutil")
                self._psutil = psutil.Process()
                self._psutil.cpu_percent(None)  # the first call only primes the counters
                psutil.cpu_percent(None)
                self._psutil_mod = psutil
            except ImportError:
                self._psutil = None
        self._proc_cpu = _ProcCpu(self.proc) if self._psutil is None else None
        self._gpu_load_node: Path | None = None
        self._jetson_probed = False

    # ---- the whole reading --------------------------------------------------------------------
    def read(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for part in (self._process, self._host, self._disks, self._gpu, self._thermal, self._power, self._emc):
            try:
                out.update(part())
            except Exception:  # a reading must never break telemetry
                log.debug("system reading %s failed", part.__name__, exc_info=True)
        temps = list(out.get("temperatures_c", {}).values())
        if "temperature_c" in out.get("gpu", {}):
            temps.append(out["gpu"]["temperature_c"])
        if temps:
            out["temperature_max_c"] = max(temps)
        return out

    # ---- process and host -----------------------------------------------------------------------
    def _process(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self._psutil is not None:
            p = self._psutil
            out["cpu_percent"] = {"process": round(p.cpu_percent(None), 1),
                                  "system": round(self._psutil_mod.cpu_percent(None), 1)}
            with p.oneshot():
                out["rss_mb"] = round(p.memory_info().rss / _MB, 1)
                out["threads"] = p.num_threads()
                if hasattr(p, "num_fds"):
                    out["open_fds"] = p.num_fds()
            return out
        assert self._proc_cpu is not None
        cpu = self._proc_cpu.read()
        if cpu:
            out["cpu_percent"] = cpu
        status = _read_text(self.proc / "self" / "status") or ""
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key == "VmRSS":
                out["rss_mb"] = round(int(value.split()[0]) / 1024, 1)  # kB
            elif key == "Threads":
                out["threads"] = int(value)
        try:
            out["open_fds"] = len(os.listdir(self.proc / "self" / "fd"))
        except OSError:
            pass
        return out

    def _host(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        try:
            l1, l5, l15 = os.getloadavg()
            out["load"] = {"1m": round(l1, 2), "5m": round(l5, 2), "15m": round(l15, 2)}
        except OSError:
            pass
        meminfo = _read_text(self.proc / "meminfo") or ""
        fields = {k: v for k, _, v in (line.partition(":") for line in meminfo.splitlines())}
        if "MemTotal" in fields:
            out["mem_total_mb"] = round(int(fields["MemTotal"].split()[0]) / 1024, 1)
        if "MemAvailable" in fields:
            out["mem_available_mb"] = round(int(fields["MemAvailable"].split()[0]) / 1024, 1)
        return out

    def _disks(self) -> dict[str, Any]:
        disks: list[dict[str, Any]] = []
        for path in self.paths:
            probe = path
            while not probe.exists() and probe != probe.parent:
                probe = probe.parent
            try:
                usage = shutil.disk_usage(probe)
            except OSError:
                continue
            disks.append({"path": str(path), "free_mb": round(usage.free / _MB, 1)})
        if not disks:
            return {}
        return {"disks": disks, "disk_free_mb": min(d["free_mb"] for d in disks)}

    # ---- GPU / SoC ------------------------------------------------------------------------------
    def _gpu(self) -> dict[str, Any]:
        gpu: dict[str, Any] = self._nvml.read() if self._nvml is not None else {}
        if "util_percent" not in gpu:
            node = self._jetson_gpu_load_node()
            if node is not None:
                load = _read_int(node)
                if load is not None:
                    gpu["util_percent"] = round(load / 10.0, 1)  # per mille
                freq = _read_int(next(iter(sorted(node.parent.glob("devfreq/*/cur_freq"))), node.parent / "-"))
                if freq is not None:
                    gpu["freq_mhz"] = round(freq / 1e6, 1)
        return {"gpu": gpu} if gpu else {}

    def _jetson_gpu_load_node(self) -> Path | None:
        if not self._jetson_probed:
            self._jetson_probed = True
            for rel in GPU_LOAD_NODES:
                if (self.root / rel).exists():
                    self._gpu_load_node = self.root / rel
                    break
        return self._gpu_load_node

    def _thermal(self) -> dict[str, Any]:
        temps: dict[str, float] = {}
        for zone in sorted((self.root / "sys/class/thermal").glob("thermal_zone*")):
            name = _read_text(zone / "type")
            milli = _read_int(zone / "temp")  # Orin's GPU zone fails to read while the GPU is idle
            if not name or milli is None or milli <= -40000 or milli >= 200000:
                continue
            temps[name] = round(milli / 1000.0, 1)
        return {"temperatures_c": temps} if temps else {}

    def _power(self) -> dict[str, Any]:
        rails: dict[str, float] = {}
        for pattern in INA3221_HWMON_GLOBS:
            for hwmon in sorted(self.root.glob(pattern)):
                for label_file in sorted(hwmon.glob("in*_label")):
                    n = label_file.name[2:-6]
                    label = _read_text(label_file)
                    mv = _read_int(hwmon / f"in{n}_input")
                    ma = _read_int(hwmon / f"curr{n}_input")
                    if not label or label.lower().startswith("sum of") or mv is None or ma is None:
                        continue
                    rails[label] = round(mv * ma / 1e6, 3)  # mV * mA -> W
        return {"power_w": rails} if rails else {}

    def _emc(self) -> dict[str, Any]:
        for rel in EMC_RATE_NODES:
            hz = _read_int(self.root / rel)
            if hz is not None:
                return {"emc_freq_mhz": round(hz / 1e6, 1)}
        return {}

    def close(self) -> None:
        if self._nvml is not None and self._nvml.mod is not None and not self._nvml.failed:
            try:
                self._nvml.mod.nvmlShutdown()
            except Exception:
                pass


# ---- tegrastats ---------------------------------------------------------------------------------
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%(?:@(\d+))?")
_GR3D = re.compile(r"\bGR3D_FREQ (\d+)%(?:@\[?(\d+)[\d,]*\]?)?")
_TEMP = re.compile(r"\b([A-Za-z][\w-]*)@(-?\d+(?:\.\d+)?)C\b")
_POWER = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")


def parse_tegrastats(line: str) -> dict[str, Any]:
    """One `tegrastats` output line -> readings (the same keys as `SystemReader.read` where they overlap).

    Handles the L4T 32 to 36 formats: ``RAM u/tMB``, ``CPU [p%@MHz,...]``, ``EMC_FREQ p%@MHz``,
    ``GR3D_FREQ p%@MHz`` or ``p%@[MHz,MHz]``, temperatures ``name@45.5C``, power rails
    ``NAME cur/avg`` in mW (with or without the ``mW`` suffix).
    """
    out: dict[str, Any] = {}
    if m := _RAM.search(line):
        out["ram_used_mb"], out["ram_total_mb"] = int(m.group(1)), int(m.group(2))
    if m := _SWAP.search(line):
        out["swap_used_mb"], out["swap_total_mb"] = int(m.group(1)), int(m.group(2))
    if m := _CPU.search(line):
        loads = [int(c.split("%")[0]) for c in m.group(1).split(",") if "%" in c]  # "off" cores skipped
        if loads:
            out["cpu_percent"] = {"system": round(sum(loads) / len(loads), 1)}
            out["cpu_cores_online"] = len(loads)
    if m := _EMC.search(line):
        out["emc_util_percent"] = float(m.group(1))
        if m.group(2):
            out["emc_freq_mhz"] = float(m.group(2))
    if m := _GR3D.search(line):
        gpu: dict[str, Any] = {"util_percent": float(m.group(1))}
        if m.group(2):
            gpu["freq_mhz"] = float(m.group(2))
        out["gpu"] = gpu
    temps = {name.lower(): float(value) for name, value in _TEMP.findall(line)
             if -40 < float(value) < 200}  # Orin reports an idle GPU sensor as -256C
    if temps:
        out["temperatures_c"] = temps
        out["temperature_max_c"] = max(temps.values())
    power: dict[str, float] = {}
    power_avg: dict[str, float] = {}
    for name, cur, avg in _POWER.findall(line):
        if name in ("RAM", "SWAP", "IRAM"):
            continue
        power[name] = int(cur) / 1000.0
        power_avg[name] = int(avg) / 1000.0
    if power:
        out["power_w"] = power
        out["power_avg_w"] = power_avg
    return out


# ---- thresholds -----------------------------------------------------------------------------------
class Thresholds:
    """Limit checks with hysteresis: an event once when a limit is crossed, ``<event>_cleared`` when back.

    Events: ``temperature_high`` (temperature_max_c over cfg.temperature_max_c; cleared `temp_margin_c`
    below), ``disk_low`` (disk_free_mb under cfg.disk_free_min_mb; cleared `disk_margin` above, as a
    share), ``fps_low`` (fps under cfg.fps_min when that is > 0; cleared `fps_margin` above).
    """

    def __init__(self, state: dict[str, bool] | None = None, *, temp_margin_c: float = 3.0,
                 disk_margin: float = 0.1, fps_margin: float = 0.05) -> None:
        self.active: dict[str, bool] = state if state is not None else {}
        self.temp_margin_c = temp_margin_c
        self.disk_margin = disk_margin
        self.fps_margin = fps_margin

    def check(self, readings: dict[str, Any], cfg: TelemetryConfig,
              fps: float | None) -> list[tuple[str, dict[str, Any]]]:
        events: list[tuple[str, dict[str, Any]]] = []
        temp = readings.get("temperature_max_c")
        if temp is not None:
            hot = {k: v for k, v in readings.get("temperatures_c", {}).items() if v > cfg.temperature_max_c}
            self._edge(events, "temperature_high", temp > cfg.temperature_max_c,
                       temp <= cfg.temperature_max_c - self.temp_margin_c,
                       {"temperature_c": temp, "limit_c": cfg.temperature_max_c, **({"zones": hot} if hot else {})})
        free = readings.get("disk_free_mb")
        if free is not None and cfg.disk_free_min_mb > 0:
            low = [d["path"] for d in readings.get("disks", []) if d["free_mb"] < cfg.disk_free_min_mb]
            self._edge(events, "disk_low", free < cfg.disk_free_min_mb,
                       free >= cfg.disk_free_min_mb * (1 + self.disk_margin),
                       {"free_mb": free, "limit_mb": cfg.disk_free_min_mb, **({"paths": low} if low else {})})
        if fps is not None and cfg.fps_min > 0:
            self._edge(events, "fps_low", fps < cfg.fps_min, fps >= cfg.fps_min * (1 + self.fps_margin),
                       {"fps": fps, "limit_fps": cfg.fps_min})
        return events

    def _edge(self, events: list[tuple[str, dict[str, Any]]], name: str, over: bool, back: bool,
              data: dict[str, Any]) -> None:
        if over and not self.active.get(name):
            self.active[name] = True
            events.append((name, data))
        elif back and self.active.get(name):
            self.active[name] = False
            events.append((f"{name}_cleared", data))


def check_thresholds(readings: dict[str, Any], cfg: TelemetryConfig, fps: float | None,
                     state: dict[str, bool] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """`Thresholds(state).check(...)`: keep `state` (a dict) between calls for the hysteresis."""
    return Thresholds(state).check(readings, cfg, fps)
