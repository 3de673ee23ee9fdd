"""Frame sources (file, synthetic, V4L2, RTSP, HTTP MJPEG, CSI, GStreamer) and the capture thread."""
