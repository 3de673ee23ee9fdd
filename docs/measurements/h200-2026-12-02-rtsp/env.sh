# This folder's runs: `source env.sh`, then `file TAG [N]` / `rtsp TAG [N]` (N streams, default 24,
# 1080p30 H.264 on NVDEC, cuda_graph.yaml) or scripts/gpu_streams.sh with $M $L $OUT.
# Needs $OUT, /tmp/site (onnxruntime-gpu, PyNvVideoCodec, PyAV, paho-mqtt, pydantic), /tmp/m (model and
# clips), /tmp/gst (GStreamer's libraries and plugins, for the RTSP server: agent/streams_rtsp.py).
set -u
export PYTHONPATH=/tmp/site:$PWD CFGDIR=$PWD/docs/measurements/h200-2026-12-02-rtsp EDGE_AGENT_GSTREAMER_DIR=/tmp/gst
M=/tmp/m/yolov8n.onnx; C=/tmp/m/live1080p30_h264.mp4; L=/tmp/m/live1080p30_long_h264.mp4
file() { bash scripts/gpu_streams.sh streams $M $L $OUT cuda_graph "${2:-24}" "$1"; }
rtsp() { SOURCE=rtsp bash scripts/gpu_streams.sh streams $M $L $OUT cuda_graph "${2:-24}" "$1"; }
# old TAG [N]: rtsp with the demuxer of 0d2824f (PyAV's read timeout), from a copy of the tree in /tmp/cmp:
#   mkdir -p /tmp/cmp && cp -r agent /tmp/cmp/ && cp OLD_DEMUX_PY /tmp/cmp/agent/capture/sources/demux.py
R=$PWD
old() { (cd /tmp/cmp && PYTHONPATH=/tmp/site:/tmp/cmp SOURCE=rtsp bash "$R/scripts/gpu_streams.sh" streams $M $L $OUT cuda_graph "${2:-24}" "$1"); }
