"""CUDA memory layer: imports and fails clearly without CUDA; round trips on a GPU (marked gpu)."""

from __future__ import annotations

import numpy as np
import pytest

from agent.engines import cuda
from agent.errors import EngineError

HAS_GPU = cuda.device_count() > 0
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")


def test_module_imports_and_counts_without_cuda() -> None:
    assert cuda.device_count() >= 0


@pytest.mark.skipif(HAS_GPU, reason="a CUDA device is present")
def test_allocation_without_a_device_is_a_clear_engine_error() -> None:
    with pytest.raises(EngineError) as err:
        cuda.DeviceBuffer(1024)
    msg = str(err.value)
    # either the bindings are missing, or the CUDA error is named (cudaErrorNoDevice / InsufficientDriver)
    assert "cuda-python" in msg or "cudaMalloc(1024): cudaError" in msg


def test_bad_sizes_are_refused_before_cuda() -> None:
    with pytest.raises(EngineError, match="positive"):
        cuda.DeviceBuffer(0)


@pytest.mark.gpu
@needs_gpu
def test_pinned_device_round_trip_and_event_timing() -> None:
    src = np.arange(3 * 64 * 64, dtype=np.float32).reshape(1, 3, 64, 64)
    with cuda.Stream() as stream, cuda.PinnedBuffer(src.shape, src.dtype) as host_in, \
            cuda.PinnedBuffer(src.shape, src.dtype) as host_out, cuda.DeviceBuffer(src.nbytes) as dev, \
            cuda.Event() as start, cuda.Event() as end:
        np.copyto(host_in.array, src)
        start.record(stream)
        cuda.copy_htod_async(dev, host_in, stream)
        cuda.copy_dtoh_async(host_out, dev, stream)
        end.record(stream)
        stream.synchronize()
        assert np.array_equal(host_out.array, src)
        assert end.elapsed_ms(start) >= 0.0
    assert dev.closed and host_in.closed and stream.closed
    with pytest.raises(EngineError, match="after free"):
        _ = host_in.array


@pytest.mark.gpu
@needs_gpu
def test_size_mismatch_is_refused() -> None:
    with cuda.Stream() as stream, cuda.DeviceBuffer(16) as dev, pytest.raises(EngineError, match="holds"):
        cuda.copy_htod_async(dev, np.zeros(8, np.float32), stream)


@pytest.mark.gpu
@needs_gpu
def test_pitched_copy_event_order_and_launch_free_round_trip() -> None:
    """The per-frame calls (driver path where libcuda loads): a pitched 2D copy, a copy ordered
    after another stream's event, a memset, each read back."""
    src = np.arange(8 * 48, dtype=np.uint8).reshape(8, 48)
    with cuda.Stream() as a, cuda.Stream() as b, cuda.DeviceBuffer(src.nbytes) as pitched, \
            cuda.DeviceBuffer(8 * 32) as packed, cuda.DeviceBuffer(8 * 32) as later, \
            cuda.Event(timing=False) as copied:
        cuda.copy_htod_async(pitched, src, a)
        cuda.copy_2d_async(packed.ptr, 32, pitched.ptr, 48, 32, 8, a)  # the first 32 bytes of each row
        copied.record(a)
        b.wait(copied)
        cuda.memcpy_async(later.ptr, packed.ptr, 8 * 32, "dtod", b)
        out = np.empty((8, 32), np.uint8)
        cuda.copy_dtoh_async(out, later, b)
        b.synchronize()
        assert np.array_equal(out, src[:, :32])
        cuda.memset_async(later, 7, b)
        cuda.copy_dtoh_async(out, later, b)
        copied.record(b)
        copied.synchronize()
        assert (out == 7).all()
