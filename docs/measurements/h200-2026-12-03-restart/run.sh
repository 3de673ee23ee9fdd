# This folder's program on the GPU machine: bash run.sh check | ab TAG... | udp TAG...
#   check: scripts/streams_check.py nvdec_damage and rtsp_detections
#   ab TAG...: for each TAG, 24 RTSP streams (TCP) on this tree, then on $OLD, the agent on half the
#     cores and the RTSP server on the other half (taskset), files new_TAG_* / old_TAG_*
#   udp TAG...: the same on this tree over UDP only (udp_TAG_*)
# Each call's files are packed into $OUT/MODE.tgz (a call brings back a few files only).
set -u
D=docs/measurements/h200-2026-12-03-restart
source $D/env.sh
mode=$1; shift
pinned() {  # TREE TRANSPORT TAG: one pinned run of 24 RTSP streams from TREE
  local tree=$1 transport=$2 tag=$3
  (for _ in $(seq 300); do pid=$(pgrep -n -f "streams_rtsp.py [0-9]") && break; sleep 0.2; done
   sleep 0.5; taskset -a -p -c $SV ${pid:-none} > $OUT/$tag.taskset 2>&1 && echo "server $pid pinned" \
     || echo "server NOT pinned: run $tag does not count") &
  (cd $tree && SOURCE=rtsp TRANSPORT=$transport taskset -c $AG bash scripts/gpu_streams.sh streams $M $L $OUT cuda_graph 24 $tag)
  wait
}
case $mode in
  check)
    bash scripts/gpu_streams.sh check $M $C $OUT nvdec_damage,rtsp_detections;;
  ab|udp)
    read -r AG SV < <(python3 scripts/split_cores.py)
    [ -n "$AG" ] && [ -n "$SV" ] || { echo "no CPU split from lscpu"; exit 1; }
    echo "agent on cpus $AG, RTSP server on cpus $SV"; lscpu | grep -E "^(Model name|Thread|Core|Socket|CPU\(s\))" > $OUT/lscpu.txt
    for tag in "$@"; do
      if [ $mode = ab ]; then pinned $PWD tcp new_$tag; pinned $OLD tcp old_$tag; else pinned $PWD udp udp_$tag; fi
    done;;
esac
(cd $OUT && tar czf /tmp/pack.tgz --exclude '*.tgz' . && find . -type f ! -name '*.tgz' -delete && mv /tmp/pack.tgz ./$mode.tgz)
