# A/B driver of this folder's runs: `source ab.sh; old TAG; new TAG` (24 streams, cuda_graph.yaml).
# old: the tree before (d1fd0d0, copied to /tmp/cmp/agent); new: this tree. Needs $OUT, /tmp/site, /tmp/m (../../../scripts/gpu_streams.sh).
set -u
R=$PWD
export PYTHONPATH=/tmp/site:$PWD CFGDIR=$R/docs/measurements/h200-2026-12-02-lane-fill
M=/tmp/m/yolov8n.onnx; C=/tmp/m/live1080p30_h264.mp4
old() { (cd /tmp/cmp && PYTHONPATH=/tmp/site:/tmp/cmp bash $R/scripts/gpu_streams.sh streams $M $C $OUT cuda_graph 24 "$1"); }
new() { bash scripts/gpu_streams.sh streams $M $C $OUT cuda_graph 24 "$1"; }
