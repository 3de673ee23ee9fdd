"""CI-speed accuracy check of the bundled demo model on a freshly generated held-out clip.

The clip's seed is never used in training (training stills draw from seeds 1 and 2 through
`render_scene`; videos use their own random stream). The payloads are the agent's own: capture,
letterbox, ONNX Runtime, decode, NMS and the published JSON (scripts/agent_eval.py).
"""

from __future__ import annotations

from pathlib import Path

from scripts import scenes
from scripts.agent_eval import agent_payloads
from scripts.evaluate import DEFAULT_MODEL, score_detections

HELD_OUT_SEED = 424242


def test_held_out_clip_accuracy(tmp_path: Path) -> None:
    video = tmp_path / "held_out.mp4"
    truth = scenes.write_video(video, HELD_OUT_SEED, seconds=4.0, fps=15)  # 60 frames
    payloads, times = agent_payloads(video, DEFAULT_MODEL, threads=2)
    assert [p["seq"] for p in payloads] == list(range(len(truth["frames"])))
    assert len(payloads) == 60 and times["infer"]["n"] == 60
    res = score_detections(payloads, truth)
    assert res["map50"] >= 0.90, res
    assert res["count_accuracy"] >= 0.95, res


def test_score_detections_perfect_and_empty() -> None:
    truth = {"labels": list(scenes.LABELS), "width": 100, "height": 100, "fps": 1,
             "frames": [{"index": 0, "objects": [{"class_id": 0, "label": "part", "box": [10, 10, 50, 40]}]},
                        {"index": 1, "objects": []}]}
    perfect = [{"seq": 0, "detections": [{"class_id": 0, "label": "part", "score": 0.9, "box": [10, 10, 50, 40]}]},
               {"seq": 1, "detections": [{"class_id": 1, "label": "scratch", "score": 0.3, "box": [1, 1, 9, 9]}]}]
    res = score_detections(perfect, truth)
    assert res["map50"] > 0.99 and res["map50_95"] > 0.99
    assert res["count_accuracy"] == 1.0  # the 0.3 detection is below the count threshold
    res = score_detections([], truth)
    assert res["map50"] == 0.0 and res["count_accuracy"] == 0.5
