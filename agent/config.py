"""Typed configuration loaded from YAML.

Every model forbids unknown keys (a typo must be an error, not a silent default), describes every
field and bounds every number. Validators have no side effects: nothing here touches hardware.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.errors import ConfigError

DATA_DIR = Path(__file__).parent / "data"
DEMO_MODEL = DATA_DIR / "demo" / "model.onnx"
DEMO_VIDEO = DATA_DIR / "demo" / "sample.mp4"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class BackoffConfig(_Strict):
    initial_s: float = Field(0.5, gt=0, le=60, description="first retry delay")
    max_s: float = Field(10.0, gt=0, le=600, description="cap of the exponential delay")
    jitter: float = Field(0.2, ge=0, le=1, description="random share added to or taken from a delay")

    @model_validator(mode="after")
    def _max_not_below_initial(self) -> BackoffConfig:
        if self.max_s < self.initial_s:
            raise ValueError("max_s must be >= initial_s")
        return self


_RECIPE_NAME = r"^[A-Za-z0-9_.-]{1,32}$"


class CountRangeConfig(_Strict):
    min: int = Field(0, ge=0, le=65535, description="fewest objects of the label for a pass")
    max: int | None = Field(None, ge=0, le=65535, description="most objects of the label for a pass (null: no cap)")

    @model_validator(mode="after")
    def _max_not_below_min(self) -> CountRangeConfig:
        if self.max is not None and self.max < self.min:
            raise ValueError("max must be >= min")
        return self


class InspectionRecipeConfig(_Strict):
    counts: dict[str, CountRangeConfig] = Field(
        default_factory=dict, description="label -> {min, max}: objects of that label a passing part shows"
    )
    forbidden: list[str] = Field(default_factory=list, max_length=32,
                                 description="labels that fail the part when seen once (defects)")
    min_score: float = Field(0.0, ge=0, le=1, description="detections scoring under this are ignored")
    roi: tuple[float, float, float, float] | None = Field(
        None, description="[x1, y1, x2, y2] as fractions of the frame (0..1): only detections whose box centre "
        "lies inside count; null: the whole frame"
    )
    frames: int = Field(1, ge=1, le=15, description="frames judged per trigger; the majority verdict wins")

    @model_validator(mode="after")
    def _check(self) -> InspectionRecipeConfig:
        if self.roi is not None:
            x1, y1, x2, y2 = self.roi
            if not (0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1):
                raise ValueError("roi must be [x1, y1, x2, y2] with 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1")
        labels = [*self.counts, *self.forbidden]
        if any(not lab or len(lab) > 64 for lab in labels):
            raise ValueError("labels must be 1-64 characters")
        if set(self.counts) & set(self.forbidden):
            raise ValueError(f"labels both counted and forbidden: {sorted(set(self.counts) & set(self.forbidden))}")
        # the result's `counts` value holds every listed label and must stay within 256 characters (LStream)
        size = len(json.dumps(dict.fromkeys(labels, 65535), separators=(",", ":")))
        if size > 256:
            raise ValueError(f"too many or too long labels: the counts object would take {size} > 256 characters")
        return self


class InspectionConfig(_Strict):
    enabled: bool = Field(True, description="answer inspection triggers for this camera")
    recipes: dict[str, InspectionRecipeConfig] = Field(
        default_factory=lambda: {"default": InspectionRecipeConfig()}, min_length=1, max_length=64,
        description="named pass / fail rules; a request names one, else default_recipe applies",
    )
    default_recipe: str = Field("default", pattern=_RECIPE_NAME, description="recipe of requests that name none")
    deadline_ms: int = Field(1000, ge=10, le=60000,
                             description="time from a trigger to its result before TIMEOUT (an MQTT 5 request's "
                             "Message Expiry, or a request's deadline_ms, overrides it)")
    buffer_size: int = Field(8, ge=1, le=256,
                             description="results kept while the broker is away; beyond it the oldest is dropped "
                             "and the next result carries overrun: true")
    retained_fields: bool = Field(False, description="also publish .../inspect/last/<field> retained, one value "
                                  "per topic, for PLCs without a JSON parser")
    max_request_bytes: int = Field(512, ge=16, le=65536, description="larger trigger payloads are rejected")

    @model_validator(mode="after")
    def _check(self) -> InspectionConfig:
        bad = [n for n in self.recipes if not re.match(_RECIPE_NAME, n)]
        if bad:
            raise ValueError(f"recipe names must match {_RECIPE_NAME}: {bad}")
        if self.default_recipe not in self.recipes:
            raise ValueError(f"default_recipe {self.default_recipe!r} is not among recipes {sorted(self.recipes)}")
        return self


_COUNT_NAME = r"^[A-Za-z0-9_-]{1,32}$"
_PX_MAX = 16384.0


def _check_points(points: list[tuple[float, float]]) -> None:
    for x, y in points:
        if not (0.0 <= x <= _PX_MAX and 0.0 <= y <= _PX_MAX):  # also refuses NaN
            raise ValueError(f"point [{x}, {y}] must lie within 0..{_PX_MAX:.0f} source-frame pixels")


class ZoneConfig(_Strict):
    name: str = Field(..., pattern=_COUNT_NAME, description="zone name, a topic level (edge/D/C/zone/<name>/count)")
    polygon: list[tuple[float, float]] = Field(
        ..., min_length=3, max_length=64, description="corners [x, y] in source-frame pixels, in drawing order"
    )
    labels: list[str] = Field(default_factory=list, max_length=64, description="labels counted; empty: every label")

    @model_validator(mode="after")
    def _check(self) -> ZoneConfig:
        _check_points(self.polygon)
        pts = self.polygon
        area = sum(pts[i][0] * pts[i - 1][1] - pts[i - 1][0] * pts[i][1] for i in range(len(pts))) / 2
        if abs(area) < 1.0:
            raise ValueError("polygon encloses no area (its corners lie on one line)")
        return self


class LineConfig(_Strict):
    name: str = Field(..., pattern=_COUNT_NAME, description="line name, a topic level (edge/D/C/line/<name>/in|out)")
    points: tuple[tuple[float, float], tuple[float, float]] = Field(
        ..., description="the line's two end points [[x1, y1], [x2, y2]] in source-frame pixels; objects whose "
        "anchor passes beside the segment (beyond its ends) do not cross it"
    )
    direction: Literal["left_to_right", "right_to_left", "top_to_bottom", "bottom_to_top"] = Field(
        "left_to_right", description="crossings this way count as `in`, the opposite way as `out` (left_to_right: "
        "towards larger x, for a line that is not horizontal; top_to_bottom: towards larger y, for one not vertical)"
    )
    labels: list[str] = Field(default_factory=list, max_length=64, description="labels counted; empty: every label")

    @model_validator(mode="after")
    def _check(self) -> LineConfig:
        (x1, y1), (x2, y2) = self.points
        _check_points([(x1, y1), (x2, y2)])
        if abs(x2 - x1) < 1 and abs(y2 - y1) < 1:
            raise ValueError("the line's two points must be at least 1 px apart")
        if self.direction in ("left_to_right", "right_to_left") and abs(y2 - y1) < 1:
            raise ValueError(f"direction {self.direction} needs a line that is not horizontal: use top_to_bottom "
                             "or bottom_to_top")
        if self.direction in ("top_to_bottom", "bottom_to_top") and abs(x2 - x1) < 1:
            raise ValueError(f"direction {self.direction} needs a line that is not vertical: use left_to_right "
                             "or right_to_left")
        return self


class TrackerConfig(_Strict):
    lost_frames: int = Field(30, ge=0, le=600, description="frames a lost track is kept to be found again")
    match_iou: float = Field(0.1, gt=0, le=1, description="least IoU between a track's predicted box and a detection")
    activation_score: float = Field(0.5, ge=0, le=1, description="least score for a detection to start a new track")
    high_score: float = Field(0.5, ge=0, le=1, description="ByteTrack's split: detections under it are only matched "
                              "to tracks already there (its second stage)")


class CountingConfig(_Strict):
    enabled: bool = Field(True, description="track objects and count them in zones and across lines")
    anchor: Literal["bottom_center", "center"] = Field(
        "bottom_center", description="the point of a box that decides where an object is: bottom_center (people, "
        "vehicles: where they stand), center (a top-down conveyor camera)"
    )
    min_frames: int = Field(2, ge=1, le=100, description="frames in a row an anchor must stay on the new side of a "
                            "line before the crossing counts (flicker shorter than this is ignored)")
    band_px: float = Field(2.0, ge=0, le=200, description="half-width of a dead band along each line: an anchor "
                           "inside it is on neither side, so an object stopping on the line is not counted twice")
    track_ids: bool = Field(False, description="add track_id to tracked detections in the detections payload")
    zones: list[ZoneConfig] = Field(default_factory=list, max_length=32, description="polygon zones")
    lines: list[LineConfig] = Field(default_factory=list, max_length=32, description="counting lines")
    tracker: TrackerConfig = Field(default_factory=TrackerConfig, description="ByteTrack settings")
    state_file: Path | None = Field(
        None, description="where line counters persist across restarts; default: "
        "<updates.models_dir>/../state/counters-<camera>.json"
    )

    @model_validator(mode="after")
    def _unique_names(self) -> CountingConfig:
        for kind, names in (("zone", [z.name for z in self.zones]), ("line", [li.name for li in self.lines])):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"{kind} names must be unique, got {dup} more than once")
        return self


class CommissioningConfig(_Strict):
    http_port: int | None = Field(
        None, ge=1024, le=65535, description="serve /snapshot.jpg and /counters on this local port (null: off)"
    )
    host: Literal["127.0.0.1", "::1"] = Field("127.0.0.1", description="loopback address the endpoint binds")


class CameraBackoff(BackoffConfig):
    """A camera's reopen policy: a returning camera is picked up within ~0.6 s (#8's goal: <= 1 s)."""

    initial_s: float = Field(0.25, gt=0, le=60, description="first retry delay")
    max_s: float = Field(0.5, gt=0, le=600, description="cap of the exponential delay")


class MqttBackoff(BackoffConfig):
    """The broker reconnect policy: a returning broker is reached within ~1.2 s (#8's goal: <= 2 s)."""

    initial_s: float = Field(0.2, gt=0, le=60, description="first retry delay")
    max_s: float = Field(1.0, gt=0, le=600, description="cap of the exponential delay")


def _as_backoff(cls: type[BackoffConfig], value: object) -> object:
    # a plain BackoffConfig given in code keeps its values; defaults (here and in the JSON schema) are cls's
    return value.model_dump() if isinstance(value, BackoffConfig) and not isinstance(value, cls) else value


class CameraConfig(_Strict):
    id: str = Field("cam0", pattern=r"^[A-Za-z0-9_-]{1,32}$", description="camera id used in topics")
    source: str = Field(
        ...,
        min_length=1,
        description=(
            "frame source URI: a video file path or file://, synthetic:[WxH[@FPS]], /dev/videoN or "
            "v4l2:///dev/videoN, rtsp://, http(s):// (MJPEG), csi://N (Jetson nvarguscamerasrc), "
            "gst:PIPELINE (raw GStreamer pipeline ending in appsink)"
        ),
    )
    pace: bool = Field(True, description="files only: deliver at the file's own frame rate, as if live")
    loop: bool = Field(False, description="files only: start again at the end instead of ending")
    width: int | None = Field(None, ge=16, le=8192, description="requested width (v4l2, csi, synthetic)")
    height: int | None = Field(None, ge=16, le=8192, description="requested height (v4l2, csi, synthetic)")
    fps: float | None = Field(None, gt=0, le=1000, description="requested frame rate")
    fourcc: str | None = Field(None, min_length=4, max_length=4, description="v4l2 pixel format, e.g. MJPG")
    decode: Literal["cpu", "jetson", "nvdec", "auto"] = Field(
        "cpu", description="rtsp:// and file sources: 'jetson' decodes on the Jetson's NVDEC engine through "
        "GStreamer (nvv4l2decoder, nvvidconv) instead of FFmpeg on the CPU; 'nvdec' on a discrete NVIDIA GPU "
        "through PyNvVideoCodec (the nvdec extra), frames staying on the GPU; 'auto': nvdec on a discrete GPU "
        "when installed, jetson on a Jetson, cpu otherwise (the status says which)"
    )
    codec: Literal["h264", "h265"] = Field("h264", description="rtsp:// with decode 'jetson': the stream's codec")
    rtsp_transport: Literal["tcp", "udp"] = Field(
        "tcp", description="rtsp:// only: RTP interleaved on the RTSP connection (tcp: no loss, passes NAT and "
        "firewalls) or on its own UDP ports (udp: fewer system calls per packet, but a lost packet is a damaged frame)"
    )
    open_timeout_s: float = Field(10.0, gt=0, le=300, description="network sources: open timeout")
    read_timeout_s: float = Field(5.0, gt=0, le=300, description="a read slower than this counts as a failure")
    # a returning camera is picked up within ~0.6 s (#8's goal: <= 1 s); a retry each 0.5 s costs nothing
    reconnect: CameraBackoff = Field(default_factory=CameraBackoff, description="reopen policy")

    @field_validator("reconnect", mode="before")
    @classmethod
    def _camera_backoff(cls, v: object) -> object:
        return _as_backoff(CameraBackoff, v)
    inspection: InspectionConfig | None = Field(
        None, description="PLC inspection trigger mode (edge/D/C/inspect...); null: off"
    )
    counting: CountingConfig | None = Field(
        None, description="zones and counting lines on tracked objects (edge/D/C/zone/..., line/...); null: off"
    )


class ModelConfig(_Strict):
    name: str = Field("demo", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="model name in payloads")
    version: str = Field("1", pattern=r"^[A-Za-z0-9_.-]{1,32}$", description="model version in payloads")
    path: Path = Field(DEMO_MODEL, description="ONNX model (used until an update installs another)")
    labels: list[str] | Path | None = Field(
        None, description="class labels: a list, a file with one per line, or null for the model's metadata"
    )
    decoder: Literal["auto", "yolov8", "yolov5", "end2end"] = Field(
        "auto", description="output layout: auto detects it from the output shape where unambiguous"
    )
    score_threshold: float = Field(0.25, ge=0, le=1, description="minimum score kept")
    class_thresholds: dict[str, float] = Field(
        default_factory=dict, description="per-label score thresholds overriding score_threshold"
    )
    iou_threshold: float = Field(0.45, gt=0, le=1, description="class-aware NMS IoU threshold")
    max_detections: int = Field(100, ge=1, le=10000, description="detections kept per frame")

    @field_validator("class_thresholds")
    @classmethod
    def _thresholds_in_range(cls, v: dict[str, float]) -> dict[str, float]:
        for label, thr in v.items():
            if not 0.0 <= thr <= 1.0:
                raise ValueError(f"threshold of {label!r} must be within [0, 1], got {thr}")
        return v


class ProviderConfig(_Strict):
    name: Literal["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"] = Field(
        ..., description="ONNX Runtime execution provider"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="provider options, passed as given")


class EngineConfig(_Strict):
    backend: Literal["onnxruntime", "tensorrt"] = Field("onnxruntime", description="inference backend")
    providers: list[ProviderConfig] = Field(
        default_factory=lambda: [ProviderConfig(name="CPUExecutionProvider")],
        min_length=1,
        description="ONNX Runtime providers in order of preference",
    )
    precision: Literal["fp32", "fp16", "int8"] = Field("fp32", description="engine precision")
    intra_op_threads: int = Field(0, ge=0, le=256, description="0: physical cores")
    graph_optimization: Literal["disable", "basic", "extended", "all"] = Field(
        "all", description="ONNX Runtime graph optimisation level"
    )
    require_gpu: bool = Field(False, description="refuse to start when a GPU provider falls back to CPU")
    io_binding: bool = Field(
        False,
        description="bind input / outputs to preallocated buffers on the EP's device; measured on an H100 it "
        "pays only once preprocessing writes the device buffer itself (a host frame copied in is slower)",
    )
    cuda_graph: bool = Field(
        False, description="capture the run in a CUDA graph (fixed shapes; ONNX Runtime needs every node on the GPU EP)"
    )
    graph_lanes: int = Field(
        0, ge=0, le=16,
        description="several cameras on one ONNX Runtime CUDA model with cuda_graph: sessions that each replay "
        "one captured graph on their own stream, taken by whichever camera's frame comes next; 0: "
        "min(cameras, 4); one camera runs on lanes only when this is >= 2 (its frames overlap on the GPU)",
    )
    preprocess: Literal["auto", "cpu", "gpu"] = Field(
        "auto",
        description="where letterbox / normalise and the score filter run: 'gpu' (a CUDA kernel writing the engine's "
        "device input, candidates selected on the device), 'cpu', or 'auto' (gpu on a CUDA / TensorRT engine when the "
        "CUDA Python bindings are installed, else cpu, said in the log)",
    )
    gpu_sync: Literal["block", "spin", "auto"] = Field(
        "block", description="how threads wait for the GPU: block (frees the CPU core), spin (lowest latency), auto"
    )
    placement_report: bool = Field(
        True, description="profile one run at load to report how many graph nodes each execution provider runs"
    )
    workspace_mb: int = Field(1024, ge=16, le=65536, description="TensorRT builder workspace")
    optimization_level: int = Field(3, ge=0, le=5, description="TensorRT builder optimisation level")
    dla_core: int | None = Field(None, ge=0, le=1, description="Jetson DLA core (GPU fallback on)")
    warmup_runs: int = Field(3, ge=0, le=100, description="inferences run at start on a zero input")


class TlsConfig(_Strict):
    ca_file: Path | None = Field(None, description="CA bundle to verify the broker")
    cert_file: Path | None = Field(None, description="client certificate (mutual TLS)")
    key_file: Path | None = Field(None, description="client private key (mutual TLS)")
    insecure: bool = Field(False, description="skip hostname verification (test setups only)")

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self


class MqttConfig(_Strict):
    host: str = Field("127.0.0.1", min_length=1, description="broker host")
    port: int = Field(1883, ge=1, le=65535, description="broker port")
    client_id: str | None = Field(None, description="default: edge-agent-<device_id> (unique per device)")
    protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT protocol version")
    username: str | None = Field(None, description="broker user name")
    password_file: Path | None = Field(
        None, description="file holding the password (or $CREDENTIALS_DIRECTORY/mqtt_password)"
    )
    tls: TlsConfig | None = Field(None, description="TLS settings; null for plain TCP")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keepalive")
    topic_prefix: str = Field("edge", pattern=r"^[A-Za-z0-9_/-]{1,64}$", description="topic prefix")
    detections_qos: Literal[0, 1, 2] = Field(0, description="QoS of detections messages")
    queue_size: int = Field(10000, ge=10, le=1_000_000, description="outbound queue cap (messages)")
    # a returning broker is reached within ~1.2 s (#8's goal: <= 2 s)
    reconnect: MqttBackoff = Field(default_factory=MqttBackoff, description="reconnect policy")
    enabled: bool = Field(True, description="false: run without a broker (detections only in logs)")

    @field_validator("reconnect", mode="before")
    @classmethod
    def _mqtt_backoff(cls, v: object) -> object:
        return _as_backoff(MqttBackoff, v)


class TelemetryConfig(_Strict):
    period_s: float = Field(10.0, ge=0.5, le=3600, description="telemetry publish period")
    temperature_max_c: float = Field(85.0, gt=0, le=150, description="raise an event above this")
    disk_free_min_mb: int = Field(500, ge=0, description="raise an event below this free space")
    fps_min: float = Field(0.0, ge=0, description="raise an event when fps stays under this (0: off)")
    prometheus_port: int | None = Field(None, ge=1, le=65535, description="expose /metrics (off by default)")


class CacheConfig(_Strict):
    dir: Path = Field(Path("/var/cache/edge-agent/engines"), description="engine cache directory")
    max_mb: int = Field(4096, ge=1, description="size cap; least recently used evicted first")


class UpdatesConfig(_Strict):
    enabled: bool = Field(True, description="accept model updates over MQTT")
    models_dir: Path = Field(Path("/var/lib/edge-agent/models"), description="installed model versions")
    trusted_keys: dict[str, str] = Field(
        default_factory=dict, description="key id -> Ed25519 public key (base64 raw, or PEM file path)"
    )
    groups: list[str] = Field(default_factory=list, description="fleet groups this device belongs to")
    max_model_mb: int = Field(512, ge=1, description="size cap of a model download")
    keep_versions: int = Field(3, ge=2, le=100, description="installed versions kept (active, previous, ...)")
    health_window_s: float = Field(30.0, ge=0, le=3600, description="watch a new model this long")
    latency_budget_ms: float = Field(1000.0, gt=0, description="smoke inference must stay under this")
    download_timeout_s: float = Field(60.0, gt=0, description="HTTP timeout per request")


class ServiceConfig(_Strict):
    watchdog: bool = Field(True, description="feed the systemd watchdog while the pipeline progresses")
    stall_s: float = Field(10.0, gt=0, le=600, description="a stage without progress this long is stuck")
    drain_s: float = Field(5.0, ge=0, le=120, description="bounded time to flush MQTT at stop")


class SparkplugConfig(_Strict):
    """Sparkplug B 3.0 edge node (agent/plc/sparkplug.py): group = the line, edge node = this device,
    Sparkplug device = each camera. Its own MQTT session; credentials and TLS are the `mqtt` section's."""

    enabled: bool = Field(False, description="publish NBIRTH / DBIRTH / NDATA / DDATA on spBv1.0/<group_id>/...")
    group_id: str | None = Field(
        None, pattern=r"^[^+/#\x00-\x1f]{1,64}$",
        description="Sparkplug group id: the production line (no + / #); required when enabled",
    )
    host: str | None = Field(None, min_length=1, description="broker host; null: the agent's mqtt.host")
    port: int | None = Field(None, ge=1, le=65535, description="broker port; null: the agent's mqtt.port")
    client_id: str | None = Field(
        None, min_length=1, max_length=128, description="MQTT client id; null: edge-agent-<device_id>-sparkplug"
    )
    protocol: Literal["3.1.1", "5"] = Field(
        "3.1.1", description="MQTT version: 3.1.1 with clean session, or 5 with clean start and session expiry 0"
    )
    primary_host_id: str | None = Field(
        None, pattern=r"^[^+/#\x00-\x1f]{1,64}$",
        description="wait for this Primary Host's retained spBv1.0/STATE/<id> {online: true} before each NBIRTH, "
        "and end the session (NDEATH) when it goes offline; null: publish at once",
    )
    period_s: float = Field(
        1.0, ge=0.05, le=3600, description="how often values are compared with the last published ones (report by "
        "exception: only changed values are sent); a PLC component's change notice publishes sooner"
    )
    deadband: float = Field(
        0.5, ge=0, le=1e9, description="a float metric (fps) is re-published only after moving at least this much"
    )
    state_file: Path | None = Field(
        None, description="where the bdSeq counter persists across restarts; default: "
        "<updates.models_dir>/../state/sparkplug.json"
    )

    @model_validator(mode="after")
    def _group_when_enabled(self) -> SparkplugConfig:
        if self.enabled and self.group_id is None:
            raise ValueError("group_id is required when sparkplug is enabled (the line's Sparkplug group)")
        return self


class AgentConfig(_Strict):
    device_id: str = Field(
        default_factory=lambda: os.uname().nodename.split(".")[0] or "device",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="device id used in topics; default: the host name",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    cameras: list[CameraConfig] = Field(..., min_length=1, description="frame sources, one pipeline each")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the detector")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="inference backend")
    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="broker connection and topics")
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig, description="health reporting")
    cache: CacheConfig = Field(default_factory=CacheConfig, description="engine cache")
    updates: UpdatesConfig = Field(default_factory=UpdatesConfig, description="model updates")
    service: ServiceConfig = Field(default_factory=ServiceConfig, description="systemd integration")
    commissioning: CommissioningConfig = Field(
        default_factory=CommissioningConfig, description="local commissioning view (picture and counters over HTTP)"
    )
    sparkplug: SparkplugConfig = Field(
        default_factory=SparkplugConfig, description="Sparkplug B edge node for SCADA (Ignition); off by default"
    )

    @model_validator(mode="after")
    def _unique_camera_ids(self) -> AgentConfig:
        ids = [c.id for c in self.cameras]
        if len(ids) != len(set(ids)):
            raise ValueError(f"camera ids must be unique, got {ids}")
        return self

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"edge-agent-{self.device_id}"


def _error_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def format_errors(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (typo?)"
        value = err.get("input")
        shown = "" if err["type"] in ("missing", "extra_forbidden") or isinstance(value, dict) else _shown(value)
        lines.append(f"{_error_path(tuple(err['loc']))}: {msg}{shown}")
    return lines


def _shown(value: object) -> str:
    try:
        return f" (got {value!r:.60})"
    except ValueError:  # an int past Python's 4300-digit repr limit (YAML's 0x / 0o / 0b integers have none)
        size = f" of {value.bit_length()} bits" if isinstance(value, int) else ""
        return f" (got an unprintable {type(value).__name__}{size})"


def parse_config(data: object, base_dir: Path | None = None) -> AgentConfig:
    """Validate a mapping into an AgentConfig; relative paths are taken from `base_dir`."""
    if not isinstance(data, dict):
        raise ConfigError([f"(top level): expected a mapping, got {type(data).__name__}"])
    try:
        cfg = AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc)) from None
    if base_dir is not None:
        _resolve_paths(cfg, base_dir)
    return cfg


def _resolve_paths(cfg: AgentConfig, base: Path) -> None:
    def fix(p: Path) -> Path:
        return p if p.is_absolute() else Path(os.path.normpath(base / p))

    cfg.model.path = fix(cfg.model.path)
    if isinstance(cfg.model.labels, Path):
        cfg.model.labels = fix(cfg.model.labels)
    cfg.cache.dir = fix(cfg.cache.dir)
    cfg.updates.models_dir = fix(cfg.updates.models_dir)
    if cfg.sparkplug.state_file is not None:
        cfg.sparkplug.state_file = fix(cfg.sparkplug.state_file)
    for cam in cfg.cameras:
        if cam.counting is not None and cam.counting.state_file is not None:
            cam.counting.state_file = fix(cam.counting.state_file)
        if "://" not in cam.source and ":" not in cam.source.split("/")[0] and not cam.source.startswith("/"):
            cam.source = str(fix(Path(cam.source)))


def load_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Load and validate a YAML config file; raises ConfigError naming every bad field."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"(file): cannot read {p}: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"(file): {p} is not UTF-8 text (byte {exc.start}: {exc.reason})"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError([f"(file): YAML syntax error{where}: {getattr(exc, 'problem', exc)}"]) from None
    except (ValueError, KeyError, AttributeError, TypeError, RecursionError) as exc:
        # PyYAML's constructors raise plain Python errors for scalars that parse but cannot be built
        # (ValueError: a date 2024-13-45, `!!int x`, an integer past Python's 4300-digit limit;
        # KeyError: `!!bool maybe`; AttributeError: `!!timestamp x`), and its recursive composer runs
        # out of stack on deep nesting (RecursionError): a bad file, not a crash.
        raise ConfigError([f"(file): YAML value cannot be read: {type(exc).__name__}: {str(exc)[:160]}"]) from None
    return parse_config(data if data is not None else {}, base_dir=p.resolve().parent)


def json_schema() -> str:
    """The config's JSON schema, for editors (yaml-language-server)."""
    return json.dumps(AgentConfig.model_json_schema(), indent=2)
