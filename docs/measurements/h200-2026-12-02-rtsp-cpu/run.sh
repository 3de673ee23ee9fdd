# This folder's program on the GPU machine (with $OUT): bash run.sh profile | ab K... | pinned TAG... | check
# Each call's files are packed into $OUT/TAG.tgz at its end (a call brings back a few files only).
set -u
D=docs/measurements/h200-2026-12-02-rtsp-cpu
source $D/env.sh
mode=$1
case $1 in
  profile)  # py-spy on 24 RTSP streams (TCP): by thread kind, Python and native (scripts/gpu_streams.sh profile)
    SOURCE=rtsp PROFILE_DELAY_S=40 bash scripts/gpu_streams.sh profile $M $L $OUT cuda_graph 24
    python3 scripts/pyspy_summary.py $OUT/pyspy24_cuda_graph.txt --top 14 > $OUT/pyspy24_summary.txt 2>&1
    python3 scripts/pyspy_summary.py $OUT/pyspy24_gil_cuda_graph.txt --top 14 > $OUT/pyspy24_gil_summary.txt 2>&1
    head -120 $OUT/pyspy24_summary.txt;;
  ab)  # RTP over TCP, then over UDP, 24 streams, for each pair K given: tags tK / uK (WINDOW_S: env.sh)
    shift
    for k in "$@"; do tcp t$k; udp u$k; done;;
  pinned)  # the agent and the RTSP server on separate physical cores (lscpu), 24 streams: TAG... (tcpN / udpN)
    shift
    read -r AG SV < <(python3 - <<'P'
import subprocess
rows = [l.split(",") for l in subprocess.run(["lscpu", "-p=CPU,CORE"], capture_output=True, text=True).stdout.splitlines()
        if not l.startswith("#")]
cores = sorted({int(c) for _, c in rows})
half = set(cores[:len(cores) // 2])
print(",".join(cpu for cpu, c in rows if int(c) in half), ",".join(cpu for cpu, c in rows if int(c) not in half))
P
)
    [ -n "$AG" ] && [ -n "$SV" ] || { echo "no CPU split from lscpu"; exit 1; }
    echo "agent on cpus $AG, RTSP server on cpus $SV"; lscpu | grep -E "^(Model name|Thread|Core|Socket|CPU\(s\))" > $OUT/lscpu.txt
    for tag in "$@"; do
      (for _ in $(seq 300); do pid=$(pgrep -n -f "streams_rtsp.py [0-9]") && break; sleep 0.2; done
       sleep 0.5; taskset -a -p -c $SV ${pid:-none} > $OUT/pin_$tag.taskset 2>&1 && echo "server $pid pinned" \
         || echo "server NOT pinned: run pin_$tag does not count") &
      SOURCE=rtsp TRANSPORT=${tag%%[0-9]*} taskset -c $AG bash scripts/gpu_streams.sh streams $M $L $OUT cuda_graph 24 pin_$tag
      wait
    done;;
  check)  # the demo clip over RTSP: NVDEC over TCP and UDP, CPU over TCP, against the file on the CPU
    bash scripts/gpu_streams.sh check $M $C $OUT rtsp_detections;;
esac
(cd $OUT && tar czf /tmp/pack.tgz --exclude '*.tgz' . && find . -type f ! -name '*.tgz' -delete && mv /tmp/pack.tgz ./$mode.tgz)
