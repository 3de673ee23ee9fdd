"""Several cameras on one TensorRT engine (TensorRTEngine.share), on the recording fake of the
bindings (8.6 and 10.3) and the fake CUDA runtime: one deserialize, one execution context, stream
and set of buffers per camera, outputs that equal single-context runs with no cross-talk, device
IO per context, the engine freed only with the last context, memory per extra camera in info, and
every failure to make a context a clear EngineError that leaves the other cameras serving."""

from __future__ import annotations

import ctypes
import gc
import threading
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from agent.engines.tensorrt import TensorRTEngine, build_engine_bytes
from agent.engines.trt_common import BuildOptions
from agent.errors import EngineError
from tests.engines.conftest import FakeFactory, conv_model
from tests.support.fake_tensorrt import FakeCudart

IN_BYTES, OUT_BYTES = 3 * 32 * 32 * 4, 4 * 32 * 32 * 4  # conv_model's images / output0, float32


def built(model: Path, tmp_path: Path, **options: object) -> Path:
    path = tmp_path / "engine.plan"
    path.write_bytes(build_engine_bytes(model, BuildOptions(**options)))  # type: ignore[arg-type]
    return path


def frames(n: int) -> list[np.ndarray]:
    """A different input per camera."""
    return [np.random.default_rng(10 + i).random((1, 3, 32, 32), dtype=np.float32) for i in range(n)]


def reference(model: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"images": x})[0])


def live(trt: types.ModuleType) -> tuple[int, int]:
    """(engines, contexts) the bindings still hold (Python objects freed with their last reference)."""
    gc.collect()
    return len(trt._state.engines), len(trt._state.contexts)


@pytest.mark.parametrize("cameras", [2, 4])
def test_cameras_on_one_engine_get_their_own_outputs(fake_trt: types.ModuleType, cudart: FakeCudart,
                                                     model: Path, tmp_path: Path, cameras: int) -> None:
    path = built(model, tmp_path)
    single = TensorRTEngine(path, model)
    single.load()
    xs = frames(cameras)
    alone = [single.infer(x)[0] for x in xs]  # what one context alone gives for each camera's input
    single.close()
    st = fake_trt._state
    st.calls.clear()

    first = TensorRTEngine(path, model)
    first.load()
    engines = [first] + [first.share() for _ in range(cameras - 1)]
    assert st.names().count("Runtime.deserialize_cuda_engine") == 1  # weights loaded once
    assert st.names().count("ICudaEngine.create_execution_context") == cameras
    assert live(fake_trt) == (1, cameras)
    assert [e.contexts for e in engines] == [cameras] * cameras
    streams = {e.device_stream.handle for e in engines if e.device_stream is not None}
    assert len(streams) == cameras  # a stream per camera
    addresses = [a for n, a in st.calls if n == "IExecutionContext.set_tensor_address"]
    assert len({ptr for _, ptr in addresses}) == 2 * cameras  # own input and output buffers each

    # interleaved, in turn: each camera's outputs are its own
    for _ in range(2):
        for e, x, want in zip(engines, xs, alone, strict=True):
            np.testing.assert_array_equal(e.infer(x)[0], want)
    # concurrently, one thread per camera (as the pipelines run them)
    results: dict[int, list[np.ndarray]] = {i: [] for i in range(cameras)}

    def camera(i: int) -> None:
        for _ in range(5):
            results[i].append(engines[i].infer(xs[i])[0])

    threads = [threading.Thread(target=camera, args=(i,)) for i in range(cameras)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i in range(cameras):
        assert len(results[i]) == 5
        for got in results[i]:
            np.testing.assert_array_equal(got, alone[i])
    np.testing.assert_allclose(alone[0], reference(model, xs[0]), rtol=1e-6)
    for e in engines:
        e.close()
    assert live(fake_trt) == (0, 0)
    assert cudart.live == {} and cudart.streams == set()


def test_device_io_per_context(fake_trt: types.ModuleType, cudart: FakeCudart, model: Path, tmp_path: Path) -> None:
    """Caller-owned device buffers (GPU preprocessing) bound per camera: each context runs on its own."""
    first = TensorRTEngine(built(model, tmp_path), model)
    first.load()
    second = first.share()
    xs = frames(2)
    bufs = []
    for e, x in zip((first, second), xs, strict=True):
        inp, out = cudart.cudaMalloc(IN_BYTES)[1], cudart.cudaMalloc(OUT_BYTES)[1]
        ctypes.memmove(inp, x.ctypes.data, IN_BYTES)
        assert e.bind_device(inp, [out]) == 0  # binding ids are per context
        bufs.append((inp, out))
    second.run_device(0)
    first.run_device(0)
    for (_, out), x in zip(bufs, xs, strict=True):
        got = np.frombuffer(ctypes.string_at(out, OUT_BYTES), dtype=np.float32).reshape(1, 4, 32, 32)
        np.testing.assert_allclose(got, reference(model, x), rtol=1e-6)
    with pytest.raises(EngineError, match="run_device"):
        first.infer(xs[0])  # this context runs on bound buffers now...
    third = first.share()
    np.testing.assert_allclose(third.infer(xs[1])[0], reference(model, xs[1]), rtol=1e-6)  # ...a new one does not
    for e in (first, second, third):
        e.close()
    for inp, out in bufs:
        cudart.cudaFree(inp)
        cudart.cudaFree(out)
    assert cudart.live == {}


def test_closing_one_keeps_the_others_and_the_last_frees_the_engine(
        fake_trt: types.ModuleType, cudart: FakeCudart, model: Path, tmp_path: Path) -> None:
    first = TensorRTEngine(built(model, tmp_path), model)
    first.load()
    others = [first.share(), first.share()]
    x = frames(1)[0]
    want = reference(model, x)
    first.close()  # the camera that loaded the engine goes first: the engine must stay
    assert first.contexts == 0 and [e.contexts for e in others] == [2, 2]
    assert live(fake_trt) == (1, 2)
    with pytest.raises(EngineError, match="not loaded"):
        first.infer(x)
    with pytest.raises(EngineError, match="not loaded"):
        first.share()
    np.testing.assert_allclose(others[0].infer(x)[0], want, rtol=1e-6)
    fourth = others[0].share()  # a context made after the loader closed still works
    np.testing.assert_allclose(fourth.infer(x)[0], want, rtol=1e-6)
    others[0].close()
    others[0].close()  # twice is harmless: the count drops once
    assert fourth.contexts == 2 and live(fake_trt) == (1, 2)
    np.testing.assert_allclose(others[1].infer(x)[0], want, rtol=1e-6)
    others[1].close()
    assert live(fake_trt) == (1, 1)
    fourth.close()
    assert live(fake_trt) == (0, 0)  # engine (and runtime) dropped with the last context
    assert cudart.live == {} and cudart.streams == set()


def test_failure_creating_a_context_is_a_clear_error(make_fake: FakeFactory, cudart: FakeCudart, model: Path,
                                                     tmp_path: Path) -> None:
    trt = make_fake("10.3.0.26", max_contexts=2, context_memory=5 << 20)
    first = TensorRTEngine(built(model, tmp_path), model)
    first.load()
    second = first.share()
    held = dict(cudart.live)
    with pytest.raises(EngineError, match=r"cannot run another camera on TensorRT engine engine\.plan: TensorRT "
                                          r"could not create an execution context \(each one allocates 5242880 bytes"):
        first.share()
    assert cudart.live == held  # nothing allocated for the refused camera is left
    assert first.contexts == 2 and live(trt) == (1, 2)
    x = frames(1)[0]
    for e in (first, second):
        np.testing.assert_allclose(e.infer(x)[0], reference(model, x), rtol=1e-6)
    second.close()
    third = first.share()  # the memory the closed camera held serves a new one
    third.close()
    first.close()
    assert live(trt) == (0, 0) and cudart.live == {}


def test_first_context_refused_frees_everything(make_fake: FakeFactory, cudart: FakeCudart, model: Path,
                                                tmp_path: Path) -> None:
    trt = make_fake("8.6.2.3", max_contexts=0)
    with pytest.raises(EngineError, match="could not create an execution context"):
        TensorRTEngine(built(model, tmp_path), model).load()
    assert live(trt) == (0, 0) and cudart.live == {}


def test_dynamic_batch_engine_where_each_context_needs_its_own_profile(
        make_fake: FakeFactory, cudart: FakeCudart, tmp_path: Path) -> None:
    dyn = conv_model(tmp_path / "dyn.onnx", batch="N")
    trt = make_fake("10.3.0.26", profile_per_context=True)
    first = TensorRTEngine(built(dyn, tmp_path), dyn)
    first.load()
    with pytest.raises(EngineError, match=r"refused input shape \(1, 3, 32, 32\) for 'images' on context 2 .*"
                                          r"export the model with a fixed batch of 1"):
        first.share()
    assert first.contexts == 1 and live(trt) == (1, 1)
    x = frames(1)[0]
    np.testing.assert_allclose(first.infer(x)[0], reference(dyn, x), rtol=1e-6)
    first.close()
    make_fake("10.3.0.26")  # a TensorRT that lets contexts share the profile
    first = TensorRTEngine(built(dyn, tmp_path), dyn)
    first.load()
    second = first.share()
    np.testing.assert_allclose(second.infer(x)[0], reference(dyn, x), rtol=1e-6)
    second.close()
    first.close()
    assert cudart.live == {}


def test_memory_per_extra_camera_in_engine_info(fake_trt: types.ModuleType, model: Path, tmp_path: Path) -> None:
    path = built(model, tmp_path)
    first = TensorRTEngine(path, model)
    first.load()
    first.info.extra["engine_cached"] = True  # what the factory adds is carried to the other cameras
    second = first.share()
    for e in (first, second):
        extra = e.info.to_json()
        assert extra["context_memory_bytes"] == fake_trt._state.context_memory
        assert extra["io_bytes"] == IN_BYTES + OUT_BYTES
        assert extra["memory_per_extra_camera_bytes"] == fake_trt._state.context_memory + IN_BYTES + OUT_BYTES
        assert extra["plan_bytes"] == path.stat().st_size
        assert extra["tensorrt"] == fake_trt.__version__ and extra["backend"] == "tensorrt"
    assert second.info.extra["engine_cached"] is True
    # 10.3 reads device_memory_size_v2 (device_memory_size is deprecated since 10.1); 8.6 has only the latter
    assert "ICudaEngine.device_memory_size" not in fake_trt._state.deprecated
    second.close()
    first.close()


def test_shared_contexts_keep_the_dla_core(make_fake: FakeFactory, model: Path, tmp_path: Path) -> None:
    trt = make_fake("8.6.2.3", dla_cores=2)
    path = built(model, tmp_path, precision="fp16", dla_core=1)
    first = TensorRTEngine(path, model, "fp16", dla_core=1)
    first.load()
    second = first.share()
    assert [c for c in trt._state.calls if c[0] == "Runtime.deserialize_cuda_engine"] == [
        ("Runtime.deserialize_cuda_engine", (path.stat().st_size, 1))]  # one deserialize, on core 1
    assert second.info.extra["dla_core"] == 1 and second.precision == "fp16"
    x = frames(1)[0]
    np.testing.assert_allclose(second.infer(x)[0], reference(model, x), rtol=1e-6)
    first.close()
    second.close()


def test_share_needs_a_loaded_engine(fake_trt: types.ModuleType, model: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="not loaded"):
        TensorRTEngine(built(model, tmp_path), model).share()


def test_service_runs_its_cameras_on_one_tensorrt_engine(make_fake: FakeFactory, cudart: FakeCudart,
                                                         tmp_path: Path) -> None:
    """The real service (real OpenCV decoding, the demo model) on the fake bindings: one engine
    deserialized for all cameras, each camera's detections equal a one-camera run, and the
    memory per extra camera reported in telemetry."""
    from tests.test_service_cameras import DEMO, config, rows, same, serve, variant

    trt = make_fake("10.3.0.26")
    clips = [variant(DEMO / "sample.mp4", tmp_path / "a.avi", None, 12),
             variant(DEMO / "sample.mp4", tmp_path / "b.avi", 1, 12)]
    shared, tele, _ = serve(config(tmp_path, clips, backend="tensorrt", preprocess="cpu"))
    assert trt._state.names().count("Runtime.deserialize_cuda_engine") == 1
    assert trt._state.names().count("ICudaEngine.create_execution_context") == 2
    engine = tele["engine"]
    assert engine["backend"] == "tensorrt" and engine["model_loads"] == 1 and engine["cameras_on_engine"] == 2
    assert engine["memory_per_extra_camera_bytes"] == engine["context_memory_bytes"] + engine["io_bytes"] > 0
    assert [c["frames_processed"] for c in tele["cameras"]] == [12, 12]
    assert live(trt) == (0, 0) and cudart.live == {}  # shutdown closed every camera and the engine
    for i, clip in enumerate(clips):
        alone, _, _ = serve(config(tmp_path, [clip], backend="tensorrt", preprocess="cpu"))
        same(shared[f"cam{i}"], alone["cam0"])
    assert rows(shared["cam0"]) != rows(shared["cam1"])
