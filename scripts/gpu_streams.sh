#!/usr/bin/env bash
# Issue 17's stream measurements on the GPU machine, one step per call (each under `timeout`):
#   scripts/gpu_streams.sh STEP MODEL CLIP OUTDIR [N]
# STEP: smoke (2 streams, 2 s, lanes); findmax CONFIG [N] (find-max up to N); streams CONFIG N (one run);
#       procs CONFIG K N (K processes of N streams each, side by side); check [CHECKS] (streams_check.py);
#       switch CONFIG N MS (GIL switch interval); onestream CONFIG (one camera, agent/bench.py);
#       split CONFIG N K mps|nomps [find] (N streams over K processes, MPS started and stopped around it);
#       profile CONFIG N (py-spy, from $PYSPY, on one run of N streams: by thread kind, Python and native);
#       streams CONFIG N [TAG] names its files TAG_... (A/B runs).
# FIND_FROM=N: the find-max search starts at N. WINDOW_S: the streams step's window (default 5 s).
# SOURCE=rtsp: the streams served by the GStreamer RTSP server on loopback (agent/streams_rtsp.py;
# EDGE_AGENT_GSTREAMER_DIR where GStreamer is not installed), else the clip paced as a file.
# TRANSPORT=udp|tcp: the RTSP cameras' rtsp_transport (default tcp).
# Needs PYTHONPATH with onnxruntime-gpu, PyNvVideoCodec, paho-mqtt, pydantic (see ../shared/gpu/README.md).
set -uo pipefail
step=$1; model=$2; clip=$3; out=$4; shift 4
cfgdir=${CFGDIR:-docs/measurements/h200-2026-12-01-async}  # the engine configs (yaml) of one round
case $step in
  smoke)
    timeout 150 python3 -m agent.cli bench -c "$cfgdir/cuda_graph.yaml" --model "$model" --streams 2 --decode nvdec \
      --clip "$clip" --size 1920x1080 --fps 30 --seconds 2 --json "$out/smoke.json" > "$out/smoke.txt" 2>&1
    echo "smoke rc=$?"; tail -12 "$out/smoke.txt";;
  findmax)
    cfg=$1; n=${2:-32}; name=$(basename "$cfg" .yaml)
    timeout 560 python3 -m agent.cli bench -c "$cfgdir/$cfg.yaml" --model "$model" --streams "$n" --find-max ${FIND_FROM:+--find-from $FIND_FROM} \
      --decode nvdec ${SOURCE:+--source $SOURCE} ${TRANSPORT:+--rtsp-transport $TRANSPORT} --clip "$clip" --size 1920x1080 --fps 30 --seconds 4 --json "$out/findmax_$name.json" \
      > "$out/findmax_$name.txt" 2>&1
    echo "findmax $name rc=$?"; grep -E "^N=|cpu ms/f|limit|GPU memory|N_max" "$out/findmax_$name.txt" | tail -40;;
  streams)  # [TAG]: files named TAG_streams..., for A/B runs alternating (environment switches, code trees)
    cfg=$1; n=$2; name=$(basename "$cfg" .yaml); f="$out/${3:+${3}_}streams${n}_$name"
    timeout 300 python3 -m agent.cli bench -c "$cfgdir/$cfg.yaml" --model "$model" --streams "$n" \
      --decode nvdec ${SOURCE:+--source $SOURCE} ${TRANSPORT:+--rtsp-transport $TRANSPORT} --clip "$clip" --size 1920x1080 --fps 30 --seconds "${WINDOW_S:-5}" --json "$f.json" > "$f.txt" 2>&1
    echo "streams $n $name ${3:-} rc=$?"; grep -E "^N=|cpu ms/f|limit|GPU memory" "$f.txt" | tail -20;;
  procs)  # K bench processes side by side, N streams each: cameras grouped per process
    cfg=$1; k=$2; n=$3; name=$(basename "$cfg" .yaml)
    for i in $(seq 1 "$k"); do
      timeout 300 python3 -m agent.cli bench -c "$cfgdir/$cfg.yaml" --model "$model" --streams "$n" \
        --decode nvdec ${SOURCE:+--source $SOURCE} ${TRANSPORT:+--rtsp-transport $TRANSPORT} --clip "$clip" --size 1920x1080 --fps 30 --seconds 6 \
        --json "$out/procs${k}x${n}_${name}_$i.json" > "$out/procs${k}x${n}_${name}_$i.txt" 2>&1 &
    done
    wait
    for i in $(seq 1 "$k"); do echo "process $i:"; grep -E "^N=|cpu ms/f" "$out/procs${k}x${n}_${name}_$i.txt" | head -2; done;;
  split)  # bench --streams N --processes K (cameras grouped per process), with MPS running or not: $1 CONFIG $2 N $3 K $4 mps|nomps [$5 find]
    cfg=$1; n=$2; k=$3; mps=$4; name=$(basename "$cfg" .yaml); find=${5:+--find-max}
    [ "$mps" = mps ] && nvidia-cuda-mps-control -d
    timeout 560 python3 -m agent.cli bench -c "$cfgdir/$cfg.yaml" --model "$model" --streams "$n" --processes "$k" $find ${FIND_FROM:+--find-from $FIND_FROM} \
      --decode nvdec ${SOURCE:+--source $SOURCE} ${TRANSPORT:+--rtsp-transport $TRANSPORT} --clip "$clip" --size 1920x1080 --fps 30 --seconds 5 \
      --json "$out/split${n}x${k}_${mps}${5:+_find}_$name.json" > "$out/split${n}x${k}_${mps}${5:+_find}_$name.txt" 2>&1
    echo "split $n streams, $k processes, $mps rc=$?"
    [ "$mps" = mps ] && echo quit | nvidia-cuda-mps-control
    grep -E "^N=|cpu ms/f|limit|processes|N_max" "$out/split${n}x${k}_${mps}${5:+_find}_$name.txt" | tail -24;;
  check)  # streams_check.py: the clips beside CLIP (demo1080_h264.mp4, ...); $1: which checks
    OUT=$out timeout 400 python3 scripts/streams_check.py --clips "$(dirname "$clip")" --model "$model" --only "${1:-nv12_kernel,nvdec_frames,detections}" \
      > "$out/check.txt" 2>&1
    echo "check rc=$?"; grep -vE "^(INFO|WARNING)|PyNvVideoCodec" "$out/check.txt" | tail -30;;
  switch)  # the GIL switch interval at N streams: 1 ms (the agent's) vs the MS given
    cfg=$1; n=$2; ms=$3; name=$(basename "$cfg" .yaml)
    EDGE_AGENT_SWITCH_INTERVAL_MS=$ms timeout 300 python3 -m agent.cli bench -c "$cfgdir/$cfg.yaml" --model "$model" \
      --streams "$n" --decode nvdec ${SOURCE:+--source $SOURCE} ${TRANSPORT:+--rtsp-transport $TRANSPORT} --clip "$clip" --size 1920x1080 --fps 30 --seconds 5 \
      --json "$out/switch${ms}ms_streams${n}_$name.json" > "$out/switch${ms}ms_streams${n}_$name.txt" 2>&1
    echo "switch $ms ms, $n streams, $name rc=$?"; grep -E "^N=|cpu ms/f" "$out/switch${ms}ms_streams${n}_$name.txt" | head -2;;
  onestream)  # one camera, frames in memory, paced, and live from CLIP on NVDEC: the pipeline vs the bare limits (agent/bench.py)
    cfg=$1; name=$(basename "$cfg" .yaml)
    YOLO_OFFLINE=true YOLO_AUTOINSTALL=false timeout 300 python3 -m agent.cli bench -c "$cfgdir/$cfg.yaml" \
      --model "$model" --size 1920x1080 --frames 500 --clip "$clip" --decode nvdec \
      --json "$out/onestream_$name.json" > "$out/onestream_$name.txt" 2>&1
    echo "onestream $name rc=$?"; grep -E "^path|^bare|^pipeline|^ultra|^ratios" "$out/onestream_$name.txt";;
  profile)  # where the host CPU goes at N streams: py-spy attached in the measuring window (no pause)
    cfg=$1; n=$2; name=$(basename "$cfg" .yaml); pyspy=${PYSPY:-py-spy}
    timeout 300 python3 -m agent.cli bench -c "$cfgdir/$cfg.yaml" --model "$model" --streams "$n" \
      --decode nvdec ${SOURCE:+--source $SOURCE} ${TRANSPORT:+--rtsp-transport $TRANSPORT} --clip "$clip" --size 1920x1080 --fps 30 --seconds 45 --json "$out/profile${n}_$name.json" \
      > "$out/profile${n}_$name.txt" 2>&1 &
    sleep "${PROFILE_DELAY_S:-25}"
    pid=$(pgrep -n -f "agent.cli bench -c $cfgdir/$cfg.yaml")  # python's, not timeout's
    timeout 60 "$pyspy" record --pid "$pid" -r 250 -d 10 --threads --nonblocking --format raw \
      -o "$out/pyspy${n}_$name.txt" 2>&1 | tail -2
    timeout 60 "$pyspy" record --pid "$pid" -r 250 -d 6 --threads --nonblocking --gil --format raw \
      -o "$out/pyspy${n}_gil_$name.txt" 2>&1 | tail -2
    timeout 60 "$pyspy" record --pid "$pid" -r 50 -d 6 --threads --native --format raw \
      -o "$out/pyspy${n}_native_$name.txt" 2>&1 | tail -2
    wait; echo "profile $n $name done"
    grep -E "^N=|cpu ms/f" "$out/profile${n}_$name.txt" | head -3
    for f in pyspy${n}_$name pyspy${n}_gil_$name; do
      echo "== $f"; python3 scripts/pyspy_summary.py "$out/$f.txt" --top 10 > "$out/$f.summary.txt"; head -70 "$out/$f.summary.txt"
    done;;
  *) echo "unknown step $step" >&2; exit 2;;
esac
