# This folder's runs (source it from the project root on the GPU machine, with $OUT set).
# Needs /tmp/site (onnxruntime-gpu, PyNvVideoCodec, PyAV, paho-mqtt, pydantic, cryptography), /tmp/m
# (yolov8n.onnx from scripts/export_yolov8n.py, live1080p30_long_h264.mp4 from
# agent.streams_bench.make_clip), /tmp/c (the clips of docs/measurements/h200-2026-12-02-decoder/
# make_check_clips.py), /tmp/gst (GStreamer for the RTSP server).
export PYTHONPATH=/tmp/site:$PWD CFGDIR=$PWD/docs/measurements/h200-2026-12-03-doorbell EDGE_AGENT_GSTREAMER_DIR=/tmp/gst
export WINDOW_S=${WINDOW_S:-10}
M=/tmp/m/yolov8n.onnx; C=/tmp/c/demo1080_h264.mp4; L=/tmp/m/live1080p30_long_h264.mp4
