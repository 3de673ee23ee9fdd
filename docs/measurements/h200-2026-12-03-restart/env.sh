# This folder's runs (source it from the project root on the GPU machine, with $OUT set).
# Needs /tmp/site (onnxruntime-gpu, PyNvVideoCodec, PyAV, paho-mqtt, pydantic, cryptography), /tmp/m
# (model and clips, as docs/measurements/h200-2026-12-02-decoder/make_check_clips.py and
# agent.streams_bench.make_clip make them), /tmp/gst (GStreamer for the RTSP server).
# OLD: a copy of the tree before this change (git archive of its commit), for A/B runs side by side.
export PYTHONPATH=/tmp/site:$PWD CFGDIR=$PWD/docs/measurements/h200-2026-12-03-restart EDGE_AGENT_GSTREAMER_DIR=/tmp/gst
export WINDOW_S=${WINDOW_S:-10}
M=/tmp/m/yolov8n.onnx; C=/tmp/m/demo1080_h264.mp4; L=/tmp/m/live1080p30_long_h264.mp4
OLD=${OLD:-$PWD/.carry/old}
