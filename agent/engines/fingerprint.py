"""What this device and its runtimes are, read (never assumed) for the engine cache key.

Every field is read from the machine; a field that cannot be read is "unknown", a component that
is read as absent (no TensorRT installed, no CUDA device, not a Jetson) is "none".

Trust: a built engine is only valid for the runtime and device it was built on. The fingerprint
goes into the cache key, so a device that reads different values computes a different key and
never sees an engine built elsewhere. A field that could not be read ("unknown") on a device would
make every such device compute the same key, so an engine keyed by it could travel to a device it
does not fit (a cache directory copied into an image, say). `is_trustworthy(fp, backend,
providers)` says whether every field that matters for that backend was really read;
`key_fingerprint` then pins an untrusted fingerprint to this one host (`portable=false` plus the
host id), so such an engine is never taken by another device.

Telling Jetson modules apart: CUDA names every Orin "Orin", compute capability 8.7 (AGX, NX and
Nano alike), so the key also holds the GPU's SM count and the board's name from
/proc/device-tree/model. The CUDA version keyed for TensorRT is the system's
(/usr/local/cuda/version.json, the CUDA libnvinfer links against on a Jetson), not what the CUDA
Python bindings report (their own build's version).

Paths (/etc/nv_tegra_release, /proc/cpuinfo, /proc/device-tree/model, /usr/local/cuda/version.json,
/etc/machine-id) are read under `root`, so tests can fake them in a temporary directory.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

__all__ = [
    "CACHE_FORMAT_VERSION",
    "NONE",
    "UNKNOWN",
    "is_trustworthy",
    "key_fingerprint",
    "parse_l4t_release",
    "read_fingerprint",
    "relevant_fields",
    "tensorrt_version",
]

# 2: fp32 TensorRT engines without TF32; key gains gpu_sm_count, board and cuda_system (issue 14)
CACHE_FORMAT_VERSION = "2"
UNKNOWN = "unknown"
NONE = "none"

_CMD_TIMEOUT_S = 5.0
# ISA extensions that change which kernels ONNX Runtime picks (its "all"-level optimised graphs can
# hold CPU-specific layouts and fused kernels) and TensorRT's host code does not care about.
_X86_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile",
              "avx512_bf16", "avx512_fp16")
_ARM_FLAGS = ("asimd", "asimdhp", "asimddp", "fphp", "sve", "sve2", "i8mm", "bf16")


def _run(cmd: list[str]) -> str | None:
    """stdout of a command, or None when it is absent, fails or hangs."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=_CMD_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def parse_l4t_release(text: str) -> str | None:
    """'# R36 (release), REVISION: 4.0, GCID: ...' -> '36.4.0' (None when the line does not parse)."""
    m = re.search(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)(?:\.(\d+))?", text)
    if m is None:
        return None
    return f"{m.group(1)}.{m.group(2)}.{m.group(3) or '0'}"


def _l4t(root: Path, arch: str) -> str:
    path = root / "etc" / "nv_tegra_release"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        text = None
    except OSError:
        return UNKNOWN
    if text is not None:
        return parse_l4t_release(text) or UNKNOWN
    if root == Path("/"):
        out = _run(["dpkg-query", "-W", "-f=${Version}", "nvidia-l4t-core"])
        if out:  # "36.4.0-20240912212859"
            return out.split("-")[0]
        if out is None and shutil.which("dpkg-query") is not None:
            return NONE  # dpkg knows no nvidia-l4t-core: not a Jetson
    # No release file: a machine other than aarch64 is never a Jetson.
    return NONE if arch not in ("aarch64", "arm64") else UNKNOWN


def _cpu(root: Path, arch: str) -> tuple[str, str]:
    """(cpu model, ISA flags of interest) from /proc/cpuinfo."""
    try:
        text = (root / "proc" / "cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return UNKNOWN, UNKNOWN
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            fields.setdefault(k.strip().lower(), v.strip())
    if "model name" in fields:
        model = fields["model name"]
    elif "cpu part" in fields:  # arm: implementer + part identify the core (0x41/0xd42 = Cortex-A78AE)
        model = f"arm {fields.get('cpu implementer', '?')}/{fields['cpu part']}"
    else:
        model = UNKNOWN
    flags = fields.get("flags") or fields.get("features")
    if flags is None:
        return model, UNKNOWN
    have = set(flags.split())
    wanted = _ARM_FLAGS if arch in ("aarch64", "arm64") else _X86_FLAGS
    return model, ",".join(f for f in wanted if f in have) or NONE


def _machine_id(root: Path) -> str:
    for p in (root / "etc" / "machine-id", root / "var" / "lib" / "dbus" / "machine-id"):
        with contextlib.suppress(OSError):
            value = p.read_text(encoding="ascii", errors="replace").strip()
            if value:
                return value
    return platform.node() or UNKNOWN


def tensorrt_version() -> str | None:
    """The real TensorRT's version, or None. `tensorrt-stubs` makes `import tensorrt` succeed with
    nothing inside, so the module only counts when it has a `__version__`."""
    try:
        trt = importlib.import_module("tensorrt")
    except Exception:  # ImportError, or a broken install raising OSError from its shared libraries
        return None
    version = getattr(trt, "__version__", None)
    return str(version) if isinstance(version, str) and version else None


def _tensorrt(root: Path) -> str:
    v = tensorrt_version()
    if v:
        return v
    if root == Path("/"):  # ORT's TensorRT EP links libnvinfer without the Python module
        for pkg in ("tensorrt", "libnvinfer10", "libnvinfer8"):
            out = _run(["dpkg-query", "-W", "-f=${Version}", pkg])
            if out:
                return out.split("-")[0]
    return NONE


def _onnxruntime() -> tuple[str, str]:
    try:
        ort: Any = importlib.import_module("onnxruntime")
    except Exception:
        return NONE, NONE
    version = str(getattr(ort, "__version__", UNKNOWN))
    try:
        eps = ",".join(ort.get_available_providers())
    except Exception:
        eps = UNKNOWN
    return version, eps


def _fmt_cuda_version(v: int) -> str:
    """12060 -> '12.6'."""
    return f"{v // 1000}.{(v % 1000) // 10}"


def _cuda_runtime_module() -> Any | None:
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except Exception:
            continue
    return None


def _cuda_system(root: Path) -> str:
    """The system CUDA toolkit's full version ('12.6.68') from /usr/local/cuda/version.json (CUDA
    11.1+; version.txt before): what libnvinfer uses on a Jetson. "none" without /usr/local/cuda."""
    base = root / "usr" / "local" / "cuda"
    try:
        data = json.loads((base / "version.json").read_text(encoding="utf-8"))
        return str(data["cuda"]["version"])
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError):
        return UNKNOWN
    try:
        text = (base / "version.txt").read_text(encoding="utf-8")  # "CUDA Version 10.2.300"
    except FileNotFoundError:
        return NONE
    except OSError:
        return UNKNOWN
    m = re.search(r"(\d+\.\d+(?:\.\d+)?)", text)
    return m.group(1) if m else UNKNOWN


def _board(root: Path, l4t: str) -> str:
    """The board's name from the device tree ('NVIDIA Jetson Orin NX Engineering Reference Developer
    Kit'): "none" where there is no device tree and the machine is not a Jetson."""
    try:
        model = (root / "proc" / "device-tree" / "model").read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return NONE if l4t == NONE else UNKNOWN
    except OSError:
        return UNKNOWN
    return model.replace("\x00", "").strip() or UNKNOWN


def _cuda_toolkit_version(root: Path) -> str | None:
    """'12.6' from /usr/local/cuda/version.json (CUDA 11.1+), for machines without the bindings."""
    try:
        data = json.loads((root / "usr" / "local" / "cuda" / "version.json").read_text(encoding="utf-8"))
        version = str(data["cuda"]["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    parts = version.split(".")
    return ".".join(parts[:2]) if len(parts) >= 2 else None


# chip id -> (the name CUDA gives the integrated GPU, compute capability): the same values
# cudaGetDeviceProperties reports, so the key does not depend on whether the bindings are installed.
_TEGRA_GPU = {0x23: ("Orin", "8.7"), 0x19: ("Xavier", "7.2")}


def _tegra_gpu(root: Path) -> dict[str, str]:
    """A Jetson's integrated GPU, read from the fuse driver (without the CUDA bindings)."""
    out: dict[str, str] = {}
    with contextlib.suppress(OSError, ValueError):
        chip = (root / "sys" / "module" / "tegra_fuse" / "parameters" / "tegra_chip_id").read_text().strip()
        known = _TEGRA_GPU.get(int(chip, 0))
        if known:
            out["gpu_name"], out["gpu_cc"] = known
    return out


def _cuda_and_gpu(root: Path, l4t: str) -> dict[str, str]:
    out = {"cuda_runtime": UNKNOWN, "cuda_driver": UNKNOWN, "gpu_name": UNKNOWN, "gpu_cc": UNKNOWN,
           "gpu_sm_count": UNKNOWN}
    rt = _cuda_runtime_module()
    if rt is not None:
        ok = rt.cudaError_t.cudaSuccess
        with contextlib.suppress(Exception):
            err, v = rt.cudaRuntimeGetVersion()
            if err == ok and v:
                out["cuda_runtime"] = _fmt_cuda_version(int(v))
        with contextlib.suppress(Exception):
            err, v = rt.cudaDriverGetVersion()
            if err == ok:
                out["cuda_driver"] = _fmt_cuda_version(int(v)) if v else NONE
        with contextlib.suppress(Exception):
            err, n = rt.cudaGetDeviceCount()
            no_device = (rt.cudaError_t.cudaErrorNoDevice, rt.cudaError_t.cudaErrorInsufficientDriver)
            if (err == ok and n == 0) or err in no_device:
                out["gpu_name"] = out["gpu_cc"] = out["gpu_sm_count"] = NONE
            elif err == ok:
                err, prop = rt.cudaGetDeviceProperties(0)
                if err == ok:
                    name = prop.name
                    name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
                    out["gpu_name"] = name.rstrip("\x00").strip() or UNKNOWN
                    out["gpu_cc"] = f"{prop.major}.{prop.minor}"
                    out["gpu_sm_count"] = str(int(prop.multiProcessorCount))
    if UNKNOWN in (out["cuda_driver"], out["gpu_name"], out["gpu_cc"]):
        smi = _run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"])
        if smi:
            parts = [p.strip() for p in smi.splitlines()[0].split(",")]
            if len(parts) == 3:
                if out["gpu_name"] == UNKNOWN:
                    out["gpu_name"] = parts[0]
                if out["gpu_cc"] == UNKNOWN:
                    out["gpu_cc"] = parts[1]
                if out["cuda_driver"] == UNKNOWN:  # the driver's own version; nvidia-smi's CUDA line
                    out["cuda_driver"] = f"driver {parts[2]}"
        elif shutil.which("nvidia-smi") is None and rt is None and out["gpu_name"] == UNKNOWN:
            out.update(_nvml())
    if out["cuda_runtime"] == UNKNOWN:
        out["cuda_runtime"] = _cuda_toolkit_version(root) or UNKNOWN
    if l4t not in (NONE, UNKNOWN) and UNKNOWN in (out["gpu_name"], out["gpu_cc"]):
        tegra = _tegra_gpu(root)
        for k in ("gpu_name", "gpu_cc"):
            if out[k] == UNKNOWN and k in tegra:
                out[k] = tegra[k]
    return out


def _nvml() -> dict[str, str]:
    try:
        pynvml: Any = importlib.import_module("pynvml")
        pynvml.nvmlInit()
    except Exception:
        return {}
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(h)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
        return {"gpu_name": name.decode() if isinstance(name, bytes) else str(name), "gpu_cc": f"{major}.{minor}",
                "cuda_driver": _fmt_cuda_version(int(pynvml.nvmlSystemGetCudaDriverVersion()))}
    except Exception:
        return {}
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


@functools.lru_cache(maxsize=8)
def _device_fields(root: Path) -> tuple[tuple[str, str], ...]:
    arch = platform.machine().lower() or UNKNOWN
    cpu_model, cpu_isa = _cpu(root, arch)
    ort_version, ort_eps = _onnxruntime()
    l4t = _l4t(root, arch)
    fields = {
        "cache_format": CACHE_FORMAT_VERSION,
        "cpu_arch": arch,
        "cpu_model": cpu_model,
        "cpu_isa": cpu_isa,
        "l4t": l4t,
        "tensorrt": _tensorrt(root),
        "onnxruntime": ort_version,
        "onnxruntime_eps": ort_eps,
        "board": _board(root, l4t),
        "cuda_system": _cuda_system(root),
        **_cuda_and_gpu(root, l4t),
    }
    return tuple(sorted(fields.items()))


def read_fingerprint(backend: str, providers: list[str], root: Path = Path("/"),
                     fresh: bool = False) -> dict[str, str]:
    """Every fingerprint field, read from this machine (memoised per root; `fresh` re-reads).

    `backend` and `providers` are recorded with it; which fields matter for them is
    `relevant_fields(backend, providers)`.
    """
    if fresh:
        _device_fields.cache_clear()
    fp = dict(_device_fields(Path(root)))
    fp["backend"] = backend
    fp["providers"] = ",".join(providers)
    return fp


def relevant_fields(backend: str, providers: list[str]) -> tuple[str, ...]:
    """The fingerprint fields an engine of this backend depends on (these go into the cache key).

    The CUDA driver version is recorded but not keyed: engines depend on the runtime, and a driver
    update on a discrete GPU must not throw every engine away (on a Jetson the driver comes with
    the L4T release, which is keyed). TensorRT is keyed by the system CUDA it links against
    (`cuda_system`), not by the CUDA Python bindings' own version (`cuda_runtime`, recorded).
    """
    common = ("cache_format", "cpu_arch", "l4t")
    gpu = ("gpu_name", "gpu_cc", "gpu_sm_count", "board", "cuda_system")
    if backend == "tensorrt":
        return (*common, "tensorrt", *gpu)
    fields: tuple[str, ...] = (*common, "onnxruntime", "cpu_model", "cpu_isa")
    if any(p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for p in providers):
        fields = (*fields, "cuda_runtime", *gpu)
    if "TensorrtExecutionProvider" in providers:
        fields = (*fields, "tensorrt")
    return fields


def is_trustworthy(fp: dict[str, str], backend: str, providers: list[str] | None = None) -> bool:
    """True when every field that matters for `backend` was really read (none is "unknown")."""
    names = relevant_fields(backend, providers if providers is not None else fp.get("providers", "").split(","))
    return all(fp.get(k, UNKNOWN) != UNKNOWN and UNKNOWN not in fp.get(k, "") for k in names)


def key_fingerprint(backend: str, providers: list[str], root: Path = Path("/"),
                    fp: dict[str, str] | None = None) -> dict[str, str]:
    """The fingerprint fields that go into a cache key for this backend.

    When one of them could not be read the entry is marked `portable=false` and pinned to this
    host's machine id: no other device computes the same key, so it can never take that engine.
    """
    fp = fp if fp is not None else read_fingerprint(backend, providers, root)
    out = {k: fp.get(k, UNKNOWN) for k in relevant_fields(backend, providers)}
    if not is_trustworthy(fp, backend, providers):
        out["portable"] = "false"
        out["host_id"] = _machine_id(Path(root))
    return out
