"""Fingerprint fields read from a faked root (Jetson release file, cpuinfo, machine id)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from agent.engines import fingerprint as fpm
from agent.engines.fingerprint import (
    NONE,
    UNKNOWN,
    is_trustworthy,
    key_fingerprint,
    parse_l4t_release,
    read_fingerprint,
    relevant_fields,
    tensorrt_version,
)

ORIN_RELEASE = "# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: Fri Sep 13\n"
ORIN_CPUINFO = """processor\t: 0
BogoMIPS\t: 62.50
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU part\t: 0xd42
"""
X86_CPUINFO = "processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse2 avx avx2 fma f16c\n"


def fake_root(tmp_path: Path, release: str | None, cpuinfo: str, machine_id: str = "abc123") -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "proc").mkdir()
    if release is not None:
        (root / "etc" / "nv_tegra_release").write_text(release)
    (root / "proc" / "cpuinfo").write_text(cpuinfo)
    (root / "etc" / "machine-id").write_text(machine_id + "\n")
    return root


@pytest.mark.parametrize(("text", "want"), [
    (ORIN_RELEASE, "36.4.0"),
    ("# R35 (release), REVISION: 5.0, GCID: 1", "35.5.0"),
    ("# R36 (release), REVISION: 3", "36.3.0"),
    ("garbage", None),
])
def test_parse_l4t_release(text: str, want: str | None) -> None:
    assert parse_l4t_release(text) == want


def orin_root(tmp_path: Path, board: str = "NVIDIA Jetson AGX Orin Developer Kit", cuda: str = "12.6.68") -> Path:
    root = fake_root(tmp_path, ORIN_RELEASE, ORIN_CPUINFO)
    (root / "proc" / "device-tree").mkdir()
    (root / "proc" / "device-tree" / "model").write_text(board + "\x00")
    fuse = root / "sys" / "module" / "tegra_fuse" / "parameters"
    fuse.mkdir(parents=True)
    (fuse / "tegra_chip_id").write_text("35\n")  # 0x23: Orin
    (root / "usr" / "local" / "cuda").mkdir(parents=True)
    (root / "usr" / "local" / "cuda" / "version.json").write_text(
        json.dumps({"cuda": {"name": "CUDA SDK", "version": cuda}, "cuda_cudart": {"version": cuda}}))
    return root


def test_jetson_fields_from_fake_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fpm.platform, "machine", lambda: "aarch64")
    root = orin_root(tmp_path)
    fp = read_fingerprint("tensorrt", ["TensorRT"], root=root, fresh=True)
    assert fp["l4t"] == "36.4.0"
    assert fp["cpu_arch"] == "aarch64"
    assert fp["cpu_model"] == "arm 0x41/0xd42"
    assert fp["cpu_isa"] == "asimd,asimdhp,asimddp,fphp"
    assert fp["cache_format"] == fpm.CACHE_FORMAT_VERSION
    assert fp["backend"] == "tensorrt"
    # points 6 and 7: the board's name and the system CUDA (what libnvinfer uses) are read
    assert fp["board"] == "NVIDIA Jetson AGX Orin Developer Kit"
    assert fp["cuda_system"] == "12.6.68"
    if fpm._cuda_runtime_module() is None:  # no CUDA bindings here: the fuse driver names the GPU as CUDA does
        assert (fp["gpu_name"], fp["gpu_cc"]) == ("Orin", "8.7")
        assert fp["gpu_sm_count"] == UNKNOWN  # only CUDA can count SMs: such a key is pinned to this host
    assert all(isinstance(v, str) and v for v in fp.values())


def test_orin_modules_and_jetpacks_get_different_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA calls AGX, NX and Nano all "Orin", CC 8.7: the board name and SM count tell them apart;
    JetPack 6.0 -> 6.1 changes the system CUDA even where the CUDA Python bindings stay the same."""
    monkeypatch.setattr(fpm.platform, "machine", lambda: "aarch64")
    keys = set()
    for i, (board, cuda, sm) in enumerate((("NVIDIA Jetson AGX Orin Developer Kit", "12.6.68", "16"),
                                          ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", "12.6.68", "8"),
                                          ("NVIDIA Jetson Orin Nano Engineering Reference Developer Kit", "12.6.68",
                                           "8"),
                                          ("NVIDIA Jetson AGX Orin Developer Kit", "12.2.140", "16"))):
        fp = read_fingerprint("tensorrt", ["TensorRT"], root=orin_root(tmp_path / str(i), board, cuda), fresh=True)
        fp.update({"gpu_name": "Orin", "gpu_cc": "8.7", "gpu_sm_count": sm, "tensorrt": "10.3.0.30"})
        fields = key_fingerprint("tensorrt", ["TensorRT"], fp=fp)
        assert {"board", "gpu_sm_count", "cuda_system"} <= set(fields) and "portable" not in fields
        keys.add(tuple(sorted(fields.items())))
    assert len(keys) == 4


def test_missing_release_file_on_x86_is_none_not_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fpm.platform, "machine", lambda: "x86_64")
    fp = read_fingerprint("onnxruntime", ["CPUExecutionProvider"], root=fake_root(tmp_path, None, X86_CPUINFO),
                          fresh=True)
    assert fp["l4t"] == NONE
    assert fp["cpu_model"] == "Test CPU"
    assert fp["cpu_isa"] == "avx,avx2,fma,f16c"


def test_unreadable_fields_are_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fpm.platform, "machine", lambda: "aarch64")
    root = fake_root(tmp_path, "# something else", "")
    (root / "proc" / "cpuinfo").unlink()
    fp = read_fingerprint("tensorrt", ["TensorRT"], root=root, fresh=True)
    assert fp["l4t"] == UNKNOWN  # present but unparsable
    assert fp["cpu_model"] == UNKNOWN and fp["cpu_isa"] == UNKNOWN


def test_trust_and_portability() -> None:
    names = ("cache_format", "cpu_arch", "l4t", "tensorrt", "cuda_runtime", "cuda_system", "gpu_name", "gpu_cc",
             "gpu_sm_count", "board", "onnxruntime", "cpu_model", "cpu_isa")
    good = dict.fromkeys(names, "x")
    assert is_trustworthy(good, "tensorrt", ["TensorRT"])
    assert key_fingerprint("tensorrt", ["TensorRT"], fp=good) == dict.fromkeys(relevant_fields("tensorrt", []), "x")
    bad = {**good, "gpu_cc": UNKNOWN}
    assert not is_trustworthy(bad, "tensorrt", ["TensorRT"])
    # a GPU field does not matter for ONNX Runtime on the CPU ...
    assert is_trustworthy(bad, "onnxruntime", ["CPUExecutionProvider"])
    # ... but does for its CUDA EP
    assert not is_trustworthy(bad, "onnxruntime", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    pinned = key_fingerprint("tensorrt", ["TensorRT"], fp=bad)
    assert pinned["portable"] == "false" and pinned["host_id"]


def test_untrusted_key_is_pinned_to_the_host(tmp_path: Path) -> None:
    fp = {"cache_format": "2", "cpu_arch": "aarch64", "l4t": "36.4.0", "tensorrt": "10.3.0", "cuda_system": "12.6.68",
          "gpu_sm_count": UNKNOWN, "gpu_name": "Orin", "gpu_cc": "8.7", "board": "NVIDIA Jetson AGX Orin"}
    a = key_fingerprint("tensorrt", ["TensorRT"], root=fake_root(tmp_path / "a", None, "", "device-a"), fp=fp)
    b = key_fingerprint("tensorrt", ["TensorRT"], root=fake_root(tmp_path / "b", None, "", "device-b"), fp=fp)
    assert a["host_id"] == "device-a" and b["host_id"] == "device-b"  # different keys on different devices


def test_relevant_fields_per_backend() -> None:
    cpu = relevant_fields("onnxruntime", ["CPUExecutionProvider"])
    assert "cpu_isa" in cpu and "gpu_name" not in cpu and "tensorrt" not in cpu
    assert {"gpu_name", "cuda_runtime"} <= set(relevant_fields("onnxruntime", ["CUDAExecutionProvider"]))
    assert "tensorrt" in relevant_fields("onnxruntime", ["TensorrtExecutionProvider"])
    trt = relevant_fields("tensorrt", ["TensorRT"])
    assert {"tensorrt", "cuda_system", "gpu_name", "gpu_cc", "gpu_sm_count", "board", "l4t"} <= set(trt)
    # the CUDA Python bindings' own version is not what libnvinfer runs on (point 7); the driver is not keyed
    assert "cuda_runtime" not in trt and "cuda_driver" not in trt
    assert fpm.CACHE_FORMAT_VERSION == "2"  # bumped with the key (fp32 without TF32, new fields)


def test_tensorrt_detected_by_version_not_by_import(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # what tensorrt-stubs gives
    assert tensorrt_version() is None
    real = types.ModuleType("tensorrt")
    real.__version__ = "10.3.0.30"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", real)
    assert tensorrt_version() == "10.3.0.30"


def test_fingerprint_of_this_machine_is_complete() -> None:
    fp = read_fingerprint("onnxruntime", ["CPUExecutionProvider"], fresh=True)
    for k in ("tensorrt", "onnxruntime", "onnxruntime_eps", "cuda_runtime", "cuda_driver", "gpu_name", "gpu_cc",
              "gpu_sm_count", "board", "cuda_system", "l4t", "cpu_arch", "cache_format"):
        assert isinstance(fp[k], str) and fp[k]


def test_system_cuda_and_board_edge_cases(tmp_path: Path) -> None:
    root = tmp_path / "r"
    (root / "usr" / "local" / "cuda").mkdir(parents=True)
    assert fpm._cuda_system(root) == NONE  # no version file at all
    (root / "usr" / "local" / "cuda" / "version.txt").write_text("CUDA Version 10.2.300\n")
    assert fpm._cuda_system(root) == "10.2.300"
    (root / "usr" / "local" / "cuda" / "version.json").write_text("{not json")
    assert fpm._cuda_system(root) == UNKNOWN
    assert fpm._board(root, NONE) == NONE  # no device tree, not a Jetson
    assert fpm._board(root, "36.4.0") == UNKNOWN  # a Jetson whose device tree cannot be read
