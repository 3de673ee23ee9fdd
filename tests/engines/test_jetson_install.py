"""Issue 14 point 2: what a Jetson installs brings the CUDA Python bindings the TensorRT backend
needs (JetPack has none), bounded to CUDA 12 (JetPack 6: 12.2 / 12.6), in the `jetson` extra,
Dockerfile.l4t and scripts/install.sh; the `gpu` extra stays on bindings every CUDA 12 driver loads."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]


def extra(name: str) -> list[Requirement]:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    m = re.search(rf"^{name} = \[(.*?)\]", text, re.MULTILINE | re.DOTALL)
    assert m is not None, f"no [{name}] extra in pyproject.toml"
    return [Requirement(r) for r in re.findall(r'"([^"]+)"', m.group(1))]


def cuda_python(reqs: list[Requirement]) -> Requirement:
    found = [r for r in reqs if r.name == "cuda-python"]
    assert len(found) == 1, reqs
    return found[0]


def test_jetson_extra_brings_cuda_12_bindings() -> None:
    spec = cuda_python(extra("jetson")).specifier
    # seen on the index for aarch64 / cp310 (2026-12-01): 12.2.1, 12.6.2.post1, 12.9.10 (+ cuda-bindings)
    for version in ("12.2.1", "12.6.2.post1", "12.9.10"):
        assert spec.contains(version), version
    for version in ("12.1.0", "13.0.0", "13.4.4"):
        assert not spec.contains(version), version
    assert not [r for r in extra("jetson") if r.name.startswith(("opencv", "onnxruntime", "tensorrt"))]


def test_gpu_extra_is_bounded_below_cuda_13() -> None:
    spec = cuda_python(extra("gpu")).specifier
    assert spec.contains("12.9.10") and not spec.contains("13.0.0")


def test_l4t_image_installs_the_bindings_of_its_cuda() -> None:
    text = (ROOT / "Dockerfile.l4t").read_text(encoding="utf-8")
    assert "FROM nvcr.io/nvidia/l4t-jetpack:r36.4.0" in text  # JetPack 6.1: CUDA 12.6
    m = re.search(r'"(cuda-python[^"]*)"', text)
    assert m is not None, "Dockerfile.l4t installs no cuda-python"
    spec = Requirement(m.group(1)).specifier
    assert spec.contains("12.6.2.post1") and not spec.contains("12.9.10") and not spec.contains("13.0.0")


def test_install_script_pins_the_devices_cuda_minor() -> None:
    script = ROOT / "scripts" / "install.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    text = script.read_text(encoding="utf-8")
    assert "/usr/local/cuda/version.json" in text and 'cuda-python==$cuda_mm.*' in text
    assert '"${constraint[@]}" "$stage/src[$extra]"' in text
