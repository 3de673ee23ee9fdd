# This folder's program on the GPU machine, after `source env.sh` (with $OUT):
#   bash run.sh probe | profile [VARIANT] | bench
set -u
D=docs/measurements/h200-2026-12-02-decoder
source $D/env.sh
case $1 in
  probe)  # the decoder alone, 24 paced streams, each variant in its own process (nvdec_probe.py)
    timeout 420 python3 $D/nvdec_probe.py $C --streams 24 --seconds 8 ${2:+--variants $2} --json $OUT/probe24.json 2>&1 | tail -20;;
  profile)  # py-spy --native on one probe variant, 24 paced streams: self time by innermost frame
    v=${2:-native}
    python3 $D/nvdec_probe.py $C --one "$v" --streams 24 --seconds 22 > $OUT/profile_$v.json 2>&1 &
    pid=$!; sleep 5
    timeout 40 $PYSPY record --native --threads --format raw -r 100 -d 14 --pid $pid -o $OUT/profile_$v.raw \
      > /dev/null 2>&1; echo "py-spy rc=$?"; wait $pid; tail -1 $OUT/profile_$v.json
    awk '{n=$NF; sub(/ [0-9]+$/, ""); sub(/^.*;/, ""); s[$0]+=n; t+=n} END {for (k in s) printf "%6.2f%% %s\n", 100*s[k]/t, k}' \
      $OUT/profile_$v.raw | sort -rn | head -25;;
  bench)  # the agent on NVDEC (PyNvVideoCodec): 24 paced files, then 24 / 8 / 12 RTSP streams (tags as in the folder;
           # the lease's file_ffmpeg run used the 0.5.7 FFmpeg backend, since removed: README)
    file file_nvc; rtsp rtsp_nvc1; rtsp rtsp_nvc2; rtsp rtsp_nvc 8; rtsp rtsp_nvc 12;;
esac
