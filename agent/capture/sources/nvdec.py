"""NVDEC on discrete NVIDIA GPUs (`decode: nvdec`) through PyNvVideoCodec: frames stay on the GPU.

Data flow: packets from a demuxer -> NVDEC through PyNvVideoCodec (CreateDecoder, device memory, on
this source's CUDA stream) -> each decoded NV12 frame copied
(device to device, ~3 MB at 1080p) into a buffer of this source's pool, because the decoder
reuses its own surfaces -> an `Nv12Frame` handed to the capture thread like a BGR frame. The GPU
frontend letterboxes it where it lies (agent.vision.gpu); the buffer returns to the pool when
the last reference to the frame goes (the frontend keeps one until the frame's result is read).

Two demuxers. rtsp:// streams: PyAV's (agent.capture.sources.demux), which lets the GIL go while it
waits for the network and times out after read_timeout_s; PyNvVideoCodec's own keeps the GIL while
it waits and has no timeouts, so one camera that stopped sending would stop the whole process.
Files: PyNvVideoCodec's own (a file never waits on a network; side by side on the H200 with 24
streams it cost 0.17 ms less host CPU per frame than PyAV's plus the Annex B filter, measured in
docs/measurements/h200-2026-12-02-lane-fill; EDGE_AGENT_NVDEC_DEMUX=pyav reads files through PyAV
too, for measurement and to check that path's frames on the GPU machine).

When NVDEC cannot serve (PyNvVideoCodec not installed, no GPU or CUDA bindings, a codec this GPU
cannot decode) the source says why once, in the log, and decodes on the CPU instead (the
capture's `decode` figure says `cpu (nvdec unavailable: ...)`): the camera keeps serving. A
picture NVDEC refuses mid-way (data lost in transit, RTP over UDP loses packets; a resolution
change the decoder cannot follow) is counted (`decode_errors`), and a stream demuxed by PyAV
starts over on a new decoder without leaving the stream: at the refused picture itself when it
is a keyframe (a resolution change comes with one), else at the next keyframe: blind until that
keyframe rather than for a reconnect's backoff, handshake and keyframe. A file on
PyNvVideoCodec's demuxer (no keyframe flags), or a new decoder that fails again before its first
frame (three times), ends the read with a SourceError: the capture thread reconnects with backoff.
Other cameras are not touched.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from agent.capture.sources.base import FrameSource, _Pacer, file_path, gstreamer_available, redact
from agent.capture.sources.demux import AvDemuxer, DemuxUnavailable
from agent.config import CameraConfig
from agent.engines import cuda
from agent.errors import EngineError, SourceError
from agent.vision.gpu import Nv12Frame

log = logging.getLogger(__name__)

# files through PyAV's demuxer as well ("pyav"): for measurement, and to check its frames on a GPU
_FILE_DEMUX = os.environ.get("EDGE_AGENT_NVDEC_DEMUX", "")
# new decoders in a row that fail before their first frame, before the read ends (a reconnect)
_MAX_RESTARTS = 3
# how many frames the decoder holds back: PyNvVideoCodec's DisplayDecodeLatencyType (native: its
# default, 2 frames of a 30 fps stream on the H200; low: 1, but each Decode call then waits for the
# frame with the GIL held, 1.5 ms against 0.14; docs/measurements/h200-2026-12-02-decoder)
_LATENCY = os.environ.get("EDGE_AGENT_NVDEC_LATENCY", "")
_warned: set[str] = set()
_warned_lock = threading.Lock()


class NvdecUnavailable(SourceError):
    """NVDEC cannot decode this source here (missing package, no GPU, unsupported codec)."""


def _warn_once(key: str, msg: str, *args: object) -> None:
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning(msg, *args)


def _nvc() -> Any:
    try:
        return importlib.import_module("PyNvVideoCodec")
    except ImportError as exc:
        raise NvdecUnavailable(f"PyNvVideoCodec is not installed (`pip install edge-agent[nvdec]`): {exc}") \
            from None
    except Exception as exc:  # its loader raises on a missing driver library (libnvcuvid)
        raise NvdecUnavailable(f"PyNvVideoCodec cannot load: {str(exc)[:200]}") from None


def on_jetson() -> bool:
    return Path("/etc/nv_tegra_release").exists()


def nvdec_available() -> str | None:
    """None when NVDEC through PyNvVideoCodec can be tried here, else why not."""
    try:
        spec = importlib.util.find_spec("PyNvVideoCodec")
    except (ImportError, ValueError, AttributeError):  # blocked in sys.modules, or a broken install
        spec = None
    if spec is None:
        return "PyNvVideoCodec is not installed"
    from agent.engines import cuda

    if cuda.device_count() == 0:
        return "no CUDA device (or no CUDA Python bindings)"
    return None


def choose_decode(cfg: CameraConfig) -> tuple[str, str]:
    """`decode: auto` -> (nvdec | jetson | cpu, why); other values are returned as they are."""
    if cfg.decode != "auto":
        return cfg.decode, "configured"
    if on_jetson():
        return ("jetson", "auto: a Jetson") if gstreamer_available() else \
            ("cpu", "auto: a Jetson, but this OpenCV has no GStreamer")
    why = nvdec_available()
    return ("nvdec", "auto: a discrete GPU with PyNvVideoCodec") if why is None else ("cpu", f"auto: {why}")


class _Pool:
    """Device buffers of one frame size, reused; a buffer comes back when its lease is collected.

    Each buffer has its own event, recorded after the copy into it: readers on other streams wait
    on it on the device, so the capture thread never waits for its copies. A buffer (and so its
    event) is only taken again once every frame using it is gone."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self._free: list[Any] = []
        self._lock = threading.Lock()
        self.closed = False
        self.allocated = 0

    def take(self) -> _Lease:
        from agent.engines import cuda

        with self._lock:
            item = self._free.pop() if self._free else None
        if item is None:
            buf = cuda.DeviceBuffer(self.nbytes)
            try:
                item = (buf, cuda.Event(timing=False))
            except BaseException:
                buf.free()
                raise
            self.allocated += 1
            if self.allocated == 32:
                log.warning("NVDEC frame pool at 32 buffers: frames are being held somewhere")
        return _Lease(self, *item)

    def give(self, buf: Any, ready: Any) -> None:
        with self._lock:
            if not self.closed:
                self._free.append((buf, ready))
                return
        buf.free()
        ready.free()

    def close(self) -> None:
        with self._lock:
            self.closed = True
            items, self._free = self._free, []
        for buf, ready in items:
            buf.free()
            ready.free()


class _Lease:
    __slots__ = ("buf", "pool", "ready")

    def __init__(self, pool: _Pool, buf: Any, ready: Any) -> None:
        self.pool, self.buf, self.ready = pool, buf, ready

    def __del__(self) -> None:
        try:
            self.pool.give(self.buf, self.ready)
        except Exception:  # interpreter shutdown, or the device is gone
            pass


# FFmpeg's codec names -> PyNvVideoCodec's cudaVideoCodec members (what NVDEC decodes at all)
_NV_CODECS = {"h264": "H264", "hevc": "HEVC", "av1": "AV1", "vp9": "VP9", "vp8": "VP8", "mpeg4": "MPEG4",
              "mpeg2video": "MPEG2", "mpeg1video": "MPEG1", "vc1": "VC1", "mjpeg": "JPEG"}


def _nv_codec(nvc: Any, dmx: AvDemuxer) -> Any:
    name = _NV_CODECS.get(dmx.codec)
    codec = getattr(nvc.cudaVideoCodec, name, None) if name else None
    if codec is None:
        raise NvdecUnavailable(f"NVDEC does not decode {dmx.codec}")
    return codec


class _NetDemuxer:
    """PyAV's demuxer (rtsp://): PacketData made from its Annex B packets."""

    def __init__(self, nvc: Any, target: str, what: str, network: bool, open_timeout_s: float,
                 read_timeout_s: float, transport: str = "tcp") -> None:
        try:
            self._av = AvDemuxer(target, what, network, open_timeout_s, read_timeout_s, transport)
        except DemuxUnavailable as exc:
            raise NvdecUnavailable(str(exc)) from None
        self._nvc = nvc
        try:
            self.codec = _nv_codec(nvc, self._av)
        except BaseException:
            self._av.close()
            raise
        self.what = f"{self._av.codec} ({self._av.pix_fmt})"
        self.fps, self.size = self._av.fps, (self._av.width, self._av.height)
        self.color = (self._av.matrix, self._av.full_range)
        self._resync = False  # skip to the next keyframe
        self._again = False  # the keyframe just yielded once more
        self._can_repeat = False  # the packet just yielded is a keyframe not yet repeated
        self.skipped = 0  # packets left out while waiting for a keyframe

    def caps(self) -> tuple[Any, int]:
        chroma, depth = _chroma(self._av.pix_fmt)
        return getattr(self._nvc.cudaVideoChromaFormat, chroma), depth

    def packets(self) -> Iterator[Any]:
        """PacketData for the decoder; the last one empty (the decoder hands out what it holds).

        One PacketData for all: Decode reads the bytes it points at before it returns, and the packet
        they belong to stays alive until the next one is asked for. After `resync()` a new decoder
        gets the parameter sets first, then the keyframe just refused (a resolution change: the new
        decoder takes it) or, after any other packet, the next keyframe."""
        packet = self._nvc.PacketData()
        for address, size, pts, key in self._av.packets():  # a SourceError when the stream fails or times out
            if self._resync and size:
                if not key:
                    self.skipped += 1
                    continue
                self._resync = False
                yield from self._prefix(packet, pts)
            self._can_repeat = key
            packet.bsl_data, packet.bsl, packet.pts = address, size, pts
            yield packet
            if self._again:  # this keyframe was refused: once more, to the new decoder
                self._again = self._can_repeat = False
                yield from self._prefix(packet, pts)
                packet.bsl_data, packet.bsl, packet.pts = address, size, pts
                yield packet

    def _prefix(self, packet: Any, pts: int) -> Iterator[Any]:
        prefix = self._av.prefix  # the SDP's parameter sets (files: in band, before each keyframe)
        if prefix is not None:
            packet.bsl_data, packet.bsl, packet.pts = prefix.ctypes.data, prefix.size, pts
            yield packet

    def resync(self) -> None:
        """A new decoder starts: at the keyframe just refused (once), else at the next keyframe."""
        if self._can_repeat:
            self._again = True
        else:
            self._resync = True

    def close(self) -> None:
        self._av.close()


class _FileDemuxer:
    """PyNvVideoCodec's own demuxer (files): its packets as they are, the last one empty."""

    def __init__(self, nvc: Any, target: str, what: str) -> None:
        try:
            self._dmx = nvc.CreateDemuxer(filename=target)
        except Exception as exc:
            raise SourceError(f"cannot open {what} for NVDEC: {str(exc)[:200]}") from None
        self.codec = self._dmx.GetNvCodecId()
        self.what = f"{self.codec} ({self._dmx.ChromaFormat()}, {self._dmx.BitDepth()} bit)"
        try:
            self.fps = float(self._dmx.FrameRate())
        except Exception:
            self.fps = 0.0
        try:
            self.size = (int(self._dmx.Width()), int(self._dmx.Height()))
        except Exception:
            self.size = (0, 0)
        self.color = _color(self._dmx)

    def caps(self) -> tuple[Any, int]:
        return self._dmx.ChromaFormat(), self._dmx.BitDepth()

    def packets(self) -> Iterator[Any]:
        return iter(self._dmx)

    def close(self) -> None:
        self._dmx = None


def _color(dmx: Any) -> tuple[str, bool]:
    """(matrix, full range) the stream declares; unspecified: BT.601, limited (what encoders write)."""
    try:
        space = str(dmx.ColorSpace()).upper()
    except Exception:
        space = ""
    try:
        rng = str(dmx.ColorRange()).upper()
    except Exception:
        rng = ""
    return ("bt709" if "709" in space else "bt601"), ("JPEG" in rng or "FULL" in rng)


def _chroma(pix_fmt: str) -> tuple[str, int]:
    """(cudaVideoChromaFormat member, bit depth) of an FFmpeg pixel format: yuv420p10le -> ("420", 10)."""
    chroma = "Monochrome" if pix_fmt.startswith("gray") else \
        "444" if "444" in pix_fmt else "422" if "422" in pix_fmt else "420"
    depth = 8
    for bits in (10, 12, 16):
        if f"p{bits}" in pix_fmt:
            depth = bits
    return chroma, depth


def _geometry(frame: Any, width: int, height: int) -> tuple[int, int, int, int, int, int]:
    """(y ptr, y pitch, uv ptr, uv pitch, width, height) of a decoded NV12 frame."""
    try:
        planes = frame.cuda()
        y, uv = planes[0].__cuda_array_interface__, planes[1].__cuda_array_interface__
        h, w = int(y["shape"][0]), int(y["shape"][1])
        ypitch = int(y["strides"][0]) if y.get("strides") else w
        uvpitch = int(uv["strides"][0]) if uv.get("strides") else w
        return int(y["data"][0]), ypitch, int(uv["data"][0]), uvpitch, w, h
    except Exception:  # older layouts: one contiguous NV12 buffer of the stream's size
        ptr = int(frame.GetPtrToPlane(0))
        return ptr, width, ptr + width * height, width, width, height


class NvdecSource(FrameSource):
    """A file or rtsp:// stream decoded by NVDEC; see the module docstring."""

    def __init__(self, cfg: CameraConfig, cpu_source: Callable[[CameraConfig], FrameSource]) -> None:
        self.cfg = cfg
        self._cpu_source = cpu_source
        self._fallback: FrameSource | None = None
        self.decode_path = "nvdec"
        self.is_file = not cfg.source.startswith("rtsp://")
        self.target = str(file_path(cfg.source)) if self.is_file else cfg.source
        self._dmx: Any = None
        self._dec: Any = None
        self._packets: Any = None
        self._ready: deque[Any] = deque()
        self._pool: _Pool | None = None
        self._stream: Any = None
        self._pacer: _Pacer | None = None
        self._fps: float | None = None
        self._color = ("bt601", False)
        self._size = (0, 0)
        self._stream_size = (0, 0)
        self._decoder_args: dict[str, Any] = {}
        self._restarts = 0  # new decoders since the last frame
        self.frames_read = 0
        self.decode_errors = 0

    # ---- open / close -----------------------------------------------------------------------
    def open(self) -> None:
        if self._fallback is None:
            try:
                self._open_nvdec()
                return
            except NvdecUnavailable as exc:
                self._close_nvdec()
                _warn_once(str(exc), "camera %s: NVDEC unavailable (%s); decoding on the CPU", self.cfg.id, exc)
                self.decode_path = f"cpu (nvdec unavailable: {str(exc)[:120]})"
                self._fallback = self._cpu_source(self.cfg.model_copy(update={"decode": "cpu"}))
        self._fallback.open()

    def _open_nvdec(self) -> None:
        if self.is_file and not Path(self.target).is_file():
            raise SourceError(f"video file not found: {self.target}")
        nvc = _nvc()
        from agent.engines import cuda

        try:
            cuda.use_device(0)
            self._stream = cuda.Stream()
        except EngineError as exc:
            raise NvdecUnavailable(f"no CUDA device: {exc}") from None
        self._dmx = self._demuxer(nvc)
        codec = self._dmx.codec
        try:
            chroma, depth = self._dmx.caps()
            caps = nvc.GetDecoderCaps(gpuid=0, codec=codec, chromaformat=chroma, bitdepth=depth)
        except Exception:
            caps = {}
        if isinstance(caps, dict) and caps.get("supported") in (0, False):
            raise NvdecUnavailable(f"this GPU's NVDEC cannot decode {self._dmx.what}")
        kwargs: dict[str, Any] = {"gpuid": 0, "codec": codec, "usedevicememory": True}
        if _LATENCY:
            latency = getattr(getattr(nvc, "DisplayDecodeLatencyType", None), _LATENCY.upper(), None)
            if latency is not None:
                kwargs["latency"] = latency
            else:
                _warn_once(f"latency {_LATENCY}", "EDGE_AGENT_NVDEC_LATENCY=%r is not one of native, low, zero "
                           "(or this PyNvVideoCodec lacks it): the decoder's default is used", _LATENCY)
        ctx = cuda.current_context()
        if ctx is not None:  # the agent's (primary) context and this source's stream: ordered copies
            kwargs.update(cudacontext=ctx, cudastream=self._stream.handle)
        try:
            self._dec = nvc.CreateDecoder(**kwargs)
        except Exception as exc:
            raise NvdecUnavailable(f"NVDEC decoder for {codec}: {str(exc)[:200]}") from None
        self._decoder_args, self._restarts = kwargs, 0
        self._packets = self._dmx.packets()
        fps = self._dmx.fps
        self._fps = fps if 0.0 < fps < 1000.0 else self.cfg.fps
        self._color = self._dmx.color
        self._stream_size = self._dmx.size  # what the stream declares; each frame's planes say its real size
        self._pacer = _Pacer(self._fps or 30.0) if self.is_file and self.cfg.pace else None
        self.frames_read = 0

    def close(self) -> None:
        if self._fallback is not None:
            self._fallback.close()
            return
        self._close_nvdec()

    def _demuxer(self, nvc: Any) -> _NetDemuxer | _FileDemuxer:
        if self.is_file and _FILE_DEMUX != "pyav":
            return _FileDemuxer(nvc, self.target, self.describe())
        return _NetDemuxer(nvc, self.target, self.describe(), not self.is_file, self.cfg.open_timeout_s,
                           self.cfg.read_timeout_s, self.cfg.rtsp_transport)

    def _close_nvdec(self) -> None:
        self._ready.clear()
        if self._dmx is not None:
            self._dmx.close()
        self._dec = self._dmx = self._packets = None
        if self._stream is not None:
            try:
                self._stream.synchronize()
                self._stream.free()
            except EngineError:
                pass
            self._stream = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    # ---- frames -------------------------------------------------------------------------------
    def interrupt(self) -> None:
        super().interrupt()
        if self._fallback is not None:
            self._fallback.interrupt()

    def read(self) -> Any:
        if self._fallback is not None:
            return self._fallback.read()
        if self._dec is None:
            return None
        while not self._ready:
            packet = next(self._packets, None)  # a SourceError when a stream fails or times out
            if packet is None:
                if self.is_file and self.cfg.loop and self.frames_read > 0:
                    self._rewind()
                    continue
                return None
            with cuda.CAPTURE.shared():  # never while another thread captures a CUDA graph
                try:
                    decoded = self._dec.Decode(packet)
                except Exception as exc:
                    self._start_over(exc)
                    continue
                for f in decoded:  # each frame's event: other streams wait for the copy on the device
                    self._ready.append(self._copy(f))
        self._restarts = 0  # a frame came: the next refusal starts the count again
        frame = self._ready.popleft()
        self.frames_read += 1
        if self._pacer is not None:
            self._pacer.wait()
        return frame

    def _start_over(self, exc: Exception) -> None:
        """NVDEC refused a picture: a new decoder from that keyframe or the next (see the module
        docstring), or a SourceError where that cannot be done or did not help."""
        self.decode_errors += 1
        why = f"NVDEC could not decode {self.describe()}: {str(exc)[:200]}"
        if not isinstance(self._dmx, _NetDemuxer) or self._restarts >= _MAX_RESTARTS:
            raise SourceError(why)
        self._restarts += 1
        if self.decode_errors <= 3 or self.decode_errors % 100 == 0:
            log.warning("camera %s: %s (error %d); a new decoder starts at the next keyframe (or at this one)",
                        self.cfg.id, why, self.decode_errors)
        self._dec = None
        try:
            self._stream.synchronize()  # frames already copied out of the old decoder's surfaces
            self._dec = _nvc().CreateDecoder(**self._decoder_args)
        except Exception as exc2:
            raise SourceError(f"{why}; a new decoder: {str(exc2)[:200]}") from None
        self._dmx.resync()

    def _rewind(self) -> None:
        """The file again from its start, on the same decoder (the empty packet at its end flushed it)."""
        self._dmx.close()
        self._dmx = self._demuxer(_nvc())
        self._packets = self._dmx.packets()

    def _copy(self, f: Any) -> Any:
        yp, ypitch, uvp, uvpitch, w, h = _geometry(f, *self._stream_size)
        if w <= 0 or h <= 0 or w % 2 or h % 2:
            raise SourceError(f"NVDEC gave a frame of {w}x{h} from {self.describe()} (needs an even size)")
        if (w, h) != self._size or self._pool is None:
            if self._pool is not None:  # a resolution change: frames of the old size free themselves
                self._pool.close()
            self._pool, self._size = _Pool(w * h * 3 // 2), (w, h)
        lease = self._pool.take()
        dst = lease.buf.ptr
        if uvp == yp + ypitch * h and uvpitch == ypitch:  # UV right below Y (PyNvVideoCodec's): one copy
            cuda.copy_2d_async(dst, w, yp, ypitch, w, h * 3 // 2, self._stream)
        else:
            cuda.copy_2d_async(dst, w, yp, ypitch, w, h, self._stream)
            cuda.copy_2d_async(dst + w * h, w, uvp, uvpitch, w, h // 2, self._stream)
        lease.ready.record(self._stream)
        matrix, full = self._color
        return Nv12Frame(dst, dst + w * h, w, w, h, matrix, full, owner=lease, ready=lease.ready)

    # ---- description ----------------------------------------------------------------------------
    @property
    def live(self) -> bool:
        return self._fallback.live if self._fallback is not None else not self.is_file

    @property
    def fps(self) -> float | None:
        return self._fallback.fps if self._fallback is not None else self._fps

    def describe(self) -> str:
        if self._fallback is not None:
            return self._fallback.describe()
        what = f"file {self.target}" if self.is_file else redact(self.target)
        return f"{what} (nvdec)"


def decode_rate(clip: Path, decoders: int, seconds: float = 3.0) -> dict[str, Any]:
    """NVDEC alone: `decoders` threads, each decoding `clip` in a loop into device memory; frames/s."""
    nvc = _nvc()
    from agent.engines import cuda

    counts = [0] * decoders
    errors: list[str] = []
    stop = threading.Event()

    def work(i: int) -> None:
        try:
            cuda.use_device(0)
            dec = None
            while not stop.is_set():  # demuxed as the cameras' files are
                dmx = _FileDemuxer(nvc, str(clip), str(clip)) if _FILE_DEMUX != "pyav" else \
                    _NetDemuxer(nvc, str(clip), str(clip), False, 10.0, 10.0)
                if dec is None:
                    dec = nvc.CreateDecoder(gpuid=0, codec=dmx.codec, usedevicememory=True)
                for packet in dmx.packets():
                    counts[i] += len(dec.Decode(packet))
                    if stop.is_set():
                        break
                dmx.close()
        except Exception as exc:
            errors.append(str(exc)[:200])

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(decoders)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    c0, cpu0, t0 = sum(counts), time.process_time(), time.perf_counter()
    time.sleep(seconds)
    done, cpu, wall = sum(counts) - c0, time.process_time() - cpu0, time.perf_counter() - t0
    stop.set()
    for t in threads:
        t.join(10)
    if errors and not done:
        return {"decoders": decoders, "error": errors[0]}
    return {"decoders": decoders, "frames_per_s": round(done / wall, 1),
            "host_cpu_ms_per_frame": round(cpu * 1e3 / max(done, 1), 3), "errors": errors[:3]}
