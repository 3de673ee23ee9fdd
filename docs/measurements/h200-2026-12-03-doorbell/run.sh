# This folder's program on the GPU machine: bash run.sh check | ab TAG... | udp TAG...
#   check: scripts/streams_check.py lanes_detections, rtsp_detections and swap (the doorbell path:
#     detections per camera on lanes and over rtsp://, model swaps under load on lanes)
#   ab TAG...: for each TAG, 24 RTSP streams (TCP) with the doorbell (bell_TAG_*), then without it
#     (EDGE_AGENT_DOORBELL=0: nobell_TAG_*), same tree; the agent on half the cores and the RTSP
#     server on the other half (taskset)
#   udp TAG...: 24 RTSP streams over UDP with the doorbell (udp_TAG_*)
# Each call's files are packed into $OUT/MODE.tgz (a call brings back a few files only).
# EDGE_AGENT_DOORBELL exists at commit 9441ef9 only (the doorbell was taken out after these runs: README).
set -u
D=docs/measurements/h200-2026-12-03-doorbell
source $D/env.sh
mode=$1; shift
pinned() {  # DOORBELL TRANSPORT TAG: one pinned run of 24 RTSP streams
  local bell=$1 transport=$2 tag=$3
  (for _ in $(seq 300); do pid=$(pgrep -n -f "streams_rtsp.py [0-9]") && break; sleep 0.2; done
   sleep 0.5; taskset -a -p -c $SV ${pid:-none} > $OUT/$tag.taskset 2>&1 && echo "server $pid pinned" \
     || echo "server NOT pinned: run $tag does not count") &
  EDGE_AGENT_DOORBELL=$bell SOURCE=rtsp TRANSPORT=$transport taskset -c $AG bash scripts/gpu_streams.sh streams $M $L $OUT cuda_graph 24 $tag
  wait
}
case $mode in
  check)
    bash scripts/gpu_streams.sh check $M $C $OUT lanes_detections,rtsp_detections,swap;;
  ab|udp)
    read -r AG SV < <(python3 scripts/split_cores.py)
    [ -n "$AG" ] && [ -n "$SV" ] || { echo "no CPU split from lscpu"; exit 1; }
    echo "agent on cpus $AG, RTSP server on cpus $SV"; lscpu | grep -E "^(Model name|Thread|Core|Socket|CPU\(s\))" > $OUT/lscpu.txt
    for tag in "$@"; do
      if [ $mode = ab ]; then pinned 1 tcp bell_$tag; pinned 0 tcp nobell_$tag; else pinned 1 udp udp_$tag; fi
    done;;
esac
(cd $OUT && tar czf /tmp/pack.tgz --exclude '*.tgz' . && find . -type f ! -name '*.tgz' -delete && mv /tmp/pack.tgz ./$mode.tgz)
