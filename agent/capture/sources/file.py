"""Video files through OpenCV (any backend), or NVDEC on a Jetson through GStreamer (`decode: jetson`).

Data flow: file -> cv2.VideoCapture (FFmpeg, or a GStreamer decode pipeline) -> BGR frame, paced
at the file's rate when `pace`, looped when `loop`.
"""

from __future__ import annotations

import numpy as np

from agent.capture.sources.base import _cv2, _CvSource, _Pacer, file_path
from agent.capture.sources.gstreamer import _require_gstreamer, jetson_decode_pipeline
from agent.config import CameraConfig
from agent.errors import SourceError


class FileSource(_CvSource):
    """A video file. Lossless (`live` False). `pace`: frames are handed out at the file's own rate,
    as a camera would, but none is skipped; `loop`: it starts again at the end instead of ending."""

    def __init__(self, cfg: CameraConfig) -> None:
        super().__init__(cfg)
        self.path = file_path(cfg.source)
        self._pacer: _Pacer | None = None
        self.frames_read = 0

    def _target(self) -> tuple[str, int]:
        """What OpenCV opens: the path (any backend), or the Jetson hardware-decoding pipeline."""
        cv2 = _cv2()
        if self.cfg.decode == "jetson":
            return jetson_decode_pipeline(self.cfg, str(self.path)), cv2.CAP_GSTREAMER
        return str(self.path), cv2.CAP_ANY

    def open(self) -> None:
        if not self.path.is_file():
            raise SourceError(f"video file not found: {self.path}")
        if self.cfg.decode == "jetson":
            _require_gstreamer(f"hardware decoding of {self.path}")
        cap = self._open_capture(*self._target())
        if cap is None:
            raise SourceError(f"cannot decode video file {self.path} (unsupported container or codec?)")
        self._cap = cap
        fps = self._fps or 30.0
        self._pacer = _Pacer(fps) if self.cfg.pace else None
        self.frames_read = 0

    def _rewind(self) -> bool:
        cv2 = _cv2()
        if self._cap is not None and self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0):
            return True
        # some containers (and GStreamer pipelines) do not seek: open it again
        self.close()
        self._cap = self._open_capture(*self._target())
        return self._cap is not None

    def read(self) -> np.ndarray | None:
        img = self._grab()
        if img is None and self.cfg.loop and self.frames_read > 0 and self._rewind():
            self.frames_read = 0
            img = self._grab()
        if img is None:
            return None
        self.frames_read += 1
        if self._pacer is not None:
            self._pacer.wait()
        return img

    @property
    def live(self) -> bool:
        return False

    def describe(self) -> str:
        return f"file {self.path}" + (" (paced)" if self.cfg.pace else "") + (" (loop)" if self.cfg.loop else "")
