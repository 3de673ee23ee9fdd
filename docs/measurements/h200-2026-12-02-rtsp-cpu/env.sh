# This folder's runs: `source env.sh`, then `tcp TAG [N]` / `udp TAG [N]` (N RTSP streams, default 24,
# 1080p30 H.264 on NVDEC, cuda_graph.yaml; RTP over TCP or UDP; WINDOW_S s windows, default 10),
# `paced TAG [N]` (paced files), or scripts/gpu_streams.sh with $M $L $OUT.
# Needs $OUT, /tmp/site (onnxruntime-gpu, PyNvVideoCodec, PyAV, paho-mqtt, pydantic), /tmp/m (model and
# clips), /tmp/gst (GStreamer's libraries and plugins, for the RTSP server: agent/streams_rtsp.py),
# /tmp/pyspy/bin/py-spy for the profile step.
export PYTHONPATH=/tmp/site:$PWD CFGDIR=$PWD/docs/measurements/h200-2026-12-02-rtsp-cpu EDGE_AGENT_GSTREAMER_DIR=/tmp/gst
export PYSPY=/tmp/pyspy/bin/py-spy WINDOW_S=${WINDOW_S:-10}
M=/tmp/m/yolov8n.onnx; C=/tmp/m/live1080p30_h264.mp4; L=/tmp/m/live1080p30_long_h264.mp4
paced() { bash scripts/gpu_streams.sh streams $M $L $OUT cuda_graph "${2:-24}" "$1"; }
tcp() { SOURCE=rtsp TRANSPORT=tcp bash scripts/gpu_streams.sh streams $M $L $OUT cuda_graph "${2:-24}" "$1"; }
udp() { SOURCE=rtsp TRANSPORT=udp bash scripts/gpu_streams.sh streams $M $L $OUT cuda_graph "${2:-24}" "$1"; }
