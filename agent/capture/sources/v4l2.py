"""V4L2 cameras (/dev/videoN, v4l2:///dev/videoN) through OpenCV's V4L2 backend."""

from __future__ import annotations

import os
import urllib.parse

from agent.capture.sources.base import _cv2, _CvSource
from agent.config import CameraConfig
from agent.errors import SourceError


class V4L2Source(_CvSource):
    """A V4L2 device (USB / MIPI camera through the kernel driver). Width, height, fps and fourcc
    from the config are requested; the driver may pick the nearest mode it supports."""

    def __init__(self, cfg: CameraConfig) -> None:
        super().__init__(cfg)
        src = cfg.source
        self.device = urllib.parse.urlparse(src).path if src.startswith("v4l2:") else src

    def open(self) -> None:
        if not os.path.exists(self.device):
            raise SourceError(f"V4L2 device {self.device} does not exist (camera unplugged? wrong index?)")
        cv2 = _cv2()
        params: list[int] = []
        if self.cfg.fourcc:
            params += [cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*self.cfg.fourcc)]
        if self.cfg.width:
            params += [cv2.CAP_PROP_FRAME_WIDTH, self.cfg.width]
        if self.cfg.height:
            params += [cv2.CAP_PROP_FRAME_HEIGHT, self.cfg.height]
        if self.cfg.fps:
            params += [cv2.CAP_PROP_FPS, round(self.cfg.fps)]
        cap = self._open_capture(self.device, cv2.CAP_V4L2, params or None)
        if cap is None:
            raise SourceError(
                f"cannot open V4L2 device {self.device} (busy, no permission (video group?), or mode unsupported)"
            )
        self._cap = cap
