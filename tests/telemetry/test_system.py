"""System readings: /proc (with and without psutil), a fake Jetson sysfs tree, tegrastats lines, thresholds.

There is no Jetson here: the Jetson sysfs nodes are recreated under tmp_path with the names, units
and formats the L4T kernels expose (a test double for the file layout only; `SystemReader(root=...)`
reads them through the same code as on a device).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from agent.config import TelemetryConfig
from agent.telemetry.system import SystemReader, Thresholds, check_thresholds, parse_tegrastats


def _write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text + "\n")


@pytest.fixture
def orin_sysfs(tmp_path: Path) -> Path:
    """The nodes of a Jetson Orin (L4T 36) that the reader uses."""
    root = tmp_path / "orin"
    _write(root, "sys/devices/platform/17000000.gpu/load", "345")  # per mille
    _write(root, "sys/devices/platform/17000000.gpu/devfreq/17000000.gpu/cur_freq", "918000000")
    for i, (name, milli) in enumerate([("cpu-thermal", "45500"), ("gpu-thermal", "-256000"),
                                       ("tj-thermal", "46875"), ("soc0-thermal", "44187")]):
        _write(root, f"sys/class/thermal/thermal_zone{i}/type", name)
        _write(root, f"sys/class/thermal/thermal_zone{i}/temp", milli)  # -256 C: Orin's idle GPU sensor
    hw = "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    for n, (label, mv, ma) in enumerate([("VDD_IN", 5000, 1000), ("VDD_CPU_GPU_CV", 5000, 200),
                                          ("VDD_SOC", 5000, 300)], start=1):
        _write(root, f"{hw}/in{n}_label", label)
        _write(root, f"{hw}/in{n}_input", str(mv))
        _write(root, f"{hw}/curr{n}_input", str(ma))
    _write(root, f"{hw}/in7_label", "sum of shunt voltages")
    _write(root, f"{hw}/in7_input", "5000")
    _write(root, f"{hw}/curr7_input", "1500")
    _write(root, "sys/kernel/debug/bpmp/debug/clk/emc/rate", "2133000000")
    return root


def test_process_and_host_readings(tmp_path: Path) -> None:
    missing = tmp_path / "not" / "yet" / "engines"  # free space of the nearest existing parent
    r = SystemReader([tmp_path, missing], root=tmp_path / "empty", nvml=False)
    sum(range(200_000))
    out = r.read()
    assert out["rss_mb"] > 5 and out["threads"] >= 1 and out["open_fds"] >= 3
    assert set(out["cpu_percent"]) == {"process", "system"}
    assert set(out["load"]) == {"1m", "5m", "15m"}
    assert out["mem_total_mb"] > out["mem_available_mb"] > 0
    assert [d["path"] for d in out["disks"]] == [str(tmp_path), str(missing)]
    assert out["disk_free_mb"] == min(d["free_mb"] for d in out["disks"]) > 0
    # No GPU / SoC exposed here: absent, not 0
    for key in ("gpu", "temperatures_c", "temperature_max_c", "power_w", "emc_freq_mhz"):
        assert key not in out


def test_proc_fallback_without_psutil(tmp_path: Path) -> None:
    r = SystemReader([tmp_path], root=tmp_path, nvml=False, use_psutil=False)
    t0 = time.process_time()
    while time.process_time() - t0 < 0.05:  # burn 50 ms of CPU (several clock ticks): the figure is > 0
        sum(range(10_000))
    out = r.read()
    assert out["cpu_percent"]["process"] > 0
    assert 0 <= out["cpu_percent"]["system"] <= 100
    assert abs(out["open_fds"] - len(os.listdir("/proc/self/fd"))) <= 2
    assert out["threads"] >= 1 and out["rss_mb"] > 5


def test_jetson_sysfs(orin_sysfs: Path, tmp_path: Path) -> None:
    out = SystemReader([tmp_path], root=orin_sysfs, nvml=False).read()
    assert out["gpu"] == {"util_percent": 34.5, "freq_mhz": 918.0}
    assert out["temperatures_c"] == {"cpu-thermal": 45.5, "tj-thermal": 46.9, "soc0-thermal": 44.2}
    assert out["temperature_max_c"] == 46.9
    assert out["power_w"] == {"VDD_IN": 5.0, "VDD_CPU_GPU_CV": 1.0, "VDD_SOC": 1.5}
    assert out["emc_freq_mhz"] == 2133.0


def test_older_jetson_gpu_node(tmp_path: Path) -> None:
    root = tmp_path / "xavier"
    _write(root, "sys/devices/gpu.0/load", "1000")
    out = SystemReader([], root=root, nvml=False).read()
    assert out["gpu"] == {"util_percent": 100.0}
    assert "disks" not in out


# Real tegrastats lines (formats of L4T 36 Orin AGX, L4T 36 Orin Nano, L4T 35 Xavier NX, L4T 32 Nano).
ORIN_AGX = ("11-24-2026 10:15:01 RAM 2456/30536MB (lfb 6795x4MB) SWAP 0/15268MB (cached 0MB) "
            "CPU [2%@729,1%@729,0%@729,0%@729,off,off,off,off,0%@729,0%@729,0%@729,0%@729] EMC_FREQ 0%@2133 "
            "GR3D_FREQ 0%@[305,305] NVENC off NVDEC off NVJPG off NVJPG1 off VIC off OFA off NVDLA0 off NVDLA1 off "
            "PVA0_FREQ off APE 174 cpu@45.718C soc2@43.5C soc0@44.187C gpu@-256C tj@45.718C soc1@43.125C "
            "VDD_GPU_SOC 3189mW/3189mW VDD_CPU_CV 797mW/797mW VIN_SYS_5V0 4228mW/4228mW")
ORIN_NANO = ("RAM 3120/7620MB (lfb 3x4MB) SWAP 0/3810MB (cached 0MB) CPU [12%@1510,8%@1510,10%@1510,9%@1510,"
             "7%@1510,5%@1510] EMC_FREQ 14%@2133 GR3D_FREQ 61%@[624] NVENC off NVDEC off NVJPG off NVJPG1 off "
             "VIC off OFA off APE 200 cpu@52.5C soc2@49.843C soc0@50.281C gpu@51.5C tj@52.5C soc1@49.968C "
             "VDD_IN 7012mW/6350mW VDD_CPU_GPU_CV 2210mW/1890mW VDD_SOC 1795mW/1700mW")
XAVIER_NX = ("RAM 1815/7772MB (lfb 1x4MB) SWAP 0/3886MB (cached 0MB) CPU [3%@1190,1%@1190,0%@1190,0%@1190,"
             "off,off] EMC_FREQ 0%@1600 GR3D_FREQ 0%@114 APE 150 MTS fg 0% bg 0% AO@38C GPU@37.5C "
             "Tboard@33C Tdiode@35.5C AUX@37C CPU@38.5C thermal@37.4C PMIC@100C GPU 0/0 CPU 153/153 SOC 765/765 "
             "CV 0/0 VDDRQ 153/153 SYS5V 1474/1474")
NANO = ("RAM 1180/3956MB (lfb 233x4MB) SWAP 0/1978MB (cached 0MB) IRAM 0/252kB(lfb 252kB) CPU [9%@102,3%@102,"
        "6%@102,4%@102] EMC_FREQ 3%@1600 GR3D_FREQ 0%@76 APE 25 PLL@29.5C CPU@31.5C PMIC@100C GPU@30C AO@36.5C "
        "thermal@30.75C POM_5V_IN 1277/1277 POM_5V_GPU 0/0 POM_5V_CPU 123/123")


def test_tegrastats_orin_agx() -> None:
    out = parse_tegrastats(ORIN_AGX)
    assert out["ram_used_mb"] == 2456 and out["ram_total_mb"] == 30536
    assert out["swap_used_mb"] == 0 and out["swap_total_mb"] == 15268
    assert out["cpu_cores_online"] == 8 and out["cpu_percent"] == {"system": 0.4}
    assert out["emc_util_percent"] == 0.0 and out["emc_freq_mhz"] == 2133.0
    assert out["gpu"] == {"util_percent": 0.0, "freq_mhz": 305.0}
    assert "gpu" not in out["temperatures_c"]  # -256C: sensor off while the GPU idles
    assert out["temperatures_c"]["cpu"] == 45.718 and out["temperature_max_c"] == 45.718
    assert out["power_w"] == {"VDD_GPU_SOC": 3.189, "VDD_CPU_CV": 0.797, "VIN_SYS_5V0": 4.228}


def test_tegrastats_orin_nano() -> None:
    out = parse_tegrastats(ORIN_NANO)
    assert out["gpu"] == {"util_percent": 61.0, "freq_mhz": 624.0}
    assert out["emc_util_percent"] == 14.0
    assert out["power_w"]["VDD_IN"] == 7.012 and out["power_avg_w"]["VDD_IN"] == 6.35
    assert out["temperatures_c"]["gpu"] == 51.5


def test_tegrastats_older_formats() -> None:
    nx = parse_tegrastats(XAVIER_NX)
    assert nx["gpu"] == {"util_percent": 0.0, "freq_mhz": 114.0}
    assert nx["power_w"]["SYS5V"] == 1.474 and nx["power_w"]["GPU"] == 0.0  # no "mW" suffix before L4T 35.2
    assert nx["temperatures_c"]["tboard"] == 33.0 and nx["temperature_max_c"] == 100.0
    assert "RAM" not in nx["power_w"] and "CPU" in nx["power_w"]
    nano = parse_tegrastats(NANO)
    assert nano["ram_total_mb"] == 3956 and nano["cpu_cores_online"] == 4
    assert nano["power_w"] == {"POM_5V_IN": 1.277, "POM_5V_GPU": 0.0, "POM_5V_CPU": 0.123}
    assert "IRAM" not in nano["power_w"]
    assert parse_tegrastats("garbage") == {}


def test_thresholds_raise_once_and_clear_with_hysteresis() -> None:
    cfg = TelemetryConfig(temperature_max_c=80, disk_free_min_mb=500, fps_min=10)
    state: dict[str, bool] = {}

    def run(temp: float, free: float, fps: float | None) -> list[str]:
        readings = {"temperature_max_c": temp, "temperatures_c": {"tj-thermal": temp},
                    "disk_free_mb": free, "disks": [{"path": "/var/cache/edge-agent", "free_mb": free}]}
        return [name for name, _ in check_thresholds(readings, cfg, fps, state)]

    assert run(60, 4000, 30) == []
    assert run(81, 400, 5) == ["temperature_high", "disk_low", "fps_low"]
    assert run(82, 300, 4) == []  # still over: no repeat
    assert run(79, 520, 10.2) == []  # back under the limit but within the hysteresis band
    assert run(76.9, 560, 10.6) == ["temperature_high_cleared", "disk_low_cleared", "fps_low_cleared"]
    assert run(76, 600, 12) == []
    assert run(85, 600, None) == ["temperature_high"]  # fps unknown (not started): not judged


def test_thresholds_event_data_and_absent_readings() -> None:
    cfg = TelemetryConfig(temperature_max_c=70, disk_free_min_mb=100, fps_min=0)
    t = Thresholds()
    events = t.check({"temperature_max_c": 71.0, "temperatures_c": {"gpu-thermal": 71.0, "cpu-thermal": 60.0}},
                     cfg, fps=0.0)  # fps_min 0: fps off; no disk reading: nothing about disks
    assert events == [("temperature_high", {"temperature_c": 71.0, "limit_c": 70, "zones": {"gpu-thermal": 71.0}})]
    assert t.check({}, cfg, fps=0.0) == []  # no readings: no events, the raised one stays raised
    assert t.active == {"temperature_high": True}
