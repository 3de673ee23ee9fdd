"""Train the bundled demo detector on synthetic conveyor scenes and export it to ONNX.

A small anchor-free detector (YOLOv8-like: conv backbone to stride 32, top-down FPN, decoupled
heads on strides 8 and 16, boxes as ltrb distances x stride, task-aligned assignment). Its ONNX
export has the YOLOv8 layout: input `images` float32 [1, 3, S, S] (RGB, 0..1, letterboxed with
pad 114), output `output0` float32 [1, 4 + nc, N] (cx, cy, w, h in input pixels, then per-class
sigmoid scores).

    python scripts/train_demo.py --seed 1 --out agent/data/demo/model.onnx
    python scripts/train_demo.py --seed 2 --init model_v1.pt --images 1200 --iters 600 --lr 1e-3 \
        --version 2 --out agent/data/demo/model_v2.onnx
    python scripts/train_demo.py --fp16-from agent/data/demo/model.onnx --out agent/data/demo/model_fp16.onnx

Reproducible: same seed, same iteration count and same thread count give the same weights.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scenes

NC = len(scenes.LABELS)
STRIDES = (8, 16)
IMGSZ = 320


# --------------------------------------------------------------------------------------------------
# model


class ConvBN(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1) -> None:
        super().__init__()
        self.c1, self.c2, self.k, self.s = c1, c2, k, s
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    def fuse(self) -> None:
        bn = self.bn
        assert isinstance(bn, nn.BatchNorm2d)
        assert bn.running_var is not None and bn.running_mean is not None
        std = torch.sqrt(bn.running_var + bn.eps)
        w = self.conv.weight * (bn.weight / std).reshape(-1, 1, 1, 1)
        b = bn.bias - bn.running_mean * bn.weight / std
        conv = nn.Conv2d(self.c1, self.c2, self.k, self.s, self.k // 2, bias=True)
        conv.weight.data.copy_(w.detach())
        assert conv.bias is not None
        conv.bias.data.copy_(b.detach())
        self.conv = conv
        self.bn = nn.Identity()


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = ConvBN(c, c, 3)
        self.b = ConvBN(c, c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(self.a(x))


class Head(nn.Module):
    def __init__(self, c: int, ch: int, nc: int) -> None:
        super().__init__()
        self.box = nn.Sequential(ConvBN(c, ch, 3), ConvBN(ch, ch, 3), nn.Conv2d(ch, 4, 1))
        self.cls = nn.Sequential(ConvBN(c, ch, 3), ConvBN(ch, ch, 3), nn.Conv2d(ch, nc, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.box(x), self.cls(x)


class DemoDet(nn.Module):
    def __init__(self, nc: int = NC) -> None:
        super().__init__()
        self.nc = nc
        self.stem = ConvBN(3, 16, 3, 2)  # /2
        self.s2 = nn.Sequential(ConvBN(16, 32, 3, 2), ConvBN(32, 32, 3))  # /4
        self.s3 = nn.Sequential(ConvBN(32, 48, 3, 2), Block(48))  # /8
        self.s4 = nn.Sequential(ConvBN(48, 80, 3, 2), Block(80))  # /16
        self.s5 = nn.Sequential(ConvBN(80, 112, 3, 2), Block(112))  # /32
        self.lat5 = ConvBN(112, 80, 1)
        self.td4 = nn.Sequential(ConvBN(160, 80, 1), Block(80))
        self.lat4 = ConvBN(80, 48, 1)
        self.td3 = nn.Sequential(ConvBN(96, 48, 1), Block(48))
        self.heads = nn.ModuleList([Head(48, 48, nc), Head(80, 64, nc)])
        for h in self.heads:
            assert isinstance(h, Head)
            last_cls = h.cls[-1]
            last_box = h.box[-1]
            assert isinstance(last_cls, nn.Conv2d) and isinstance(last_box, nn.Conv2d)
            assert last_cls.bias is not None and last_box.bias is not None
            nn.init.constant_(last_cls.bias, -4.6)  # prior 0.01
            nn.init.constant_(last_box.bias, 1.0)

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        p3 = self.s3(self.s2(self.stem(x)))
        p4 = self.s4(p3)
        p5 = self.s5(p4)
        t4 = self.td4(torch.cat([F.interpolate(self.lat5(p5), size=p4.shape[2:], mode="nearest"), p4], 1))
        t3 = self.td3(torch.cat([F.interpolate(self.lat4(t4), size=p3.shape[2:], mode="nearest"), p3], 1))
        return [self.heads[0](t3), self.heads[1](t4)]

    def fuse(self) -> DemoDet:
        for m in self.modules():
            if isinstance(m, ConvBN):
                m.fuse()
        return self


def make_anchors(feats: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    pts, strides = [], []
    for (box, _), s in zip(feats, STRIDES, strict=True):
        h, w = box.shape[2:]
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
        pts.append(torch.stack([xs, ys], -1).reshape(-1, 2).add(0.5).mul(s))
        strides.append(torch.full((h * w,), float(s)))
    return torch.cat(pts), torch.cat(strides)


def flatten(feats: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ltrb raw [B, N, 4], cls logits [B, N, nc]."""
    box = torch.cat([b.flatten(2) for b, _ in feats], 2).transpose(1, 2)
    cls = torch.cat([c.flatten(2) for _, c in feats], 2).transpose(1, 2)
    return box, cls


def decode(raw: torch.Tensor, pts: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
    """ltrb raw (x stride) -> xyxy boxes in input pixels."""
    d = raw * strides[:, None]
    return torch.cat([pts - d[..., :2], pts + d[..., 2:]], -1)


class Exported(nn.Module):
    """Export wrapper: [1, 4 + nc, N] with cx, cy, w, h and sigmoid scores (YOLOv8 layout)."""

    def __init__(self, net: DemoDet, size: int) -> None:
        super().__init__()
        self.net = net
        with torch.no_grad():
            pts, strides = make_anchors(net(torch.zeros(1, 3, size, size)))
        self.pts: torch.Tensor = pts  # constants of the exported graph
        self.strides: torch.Tensor = strides

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raw, cls = flatten(self.net(x))
        d = raw * self.strides[:, None]
        lt, rb = d[..., :2], d[..., 2:]
        cxy = self.pts + (rb - lt) / 2
        wh = lt + rb
        return torch.cat([cxy, wh, cls.sigmoid()], -1).transpose(1, 2)


# --------------------------------------------------------------------------------------------------
# loss (task-aligned assignment)


def box_iou(a: torch.Tensor, b: torch.Tensor, giou: bool = False, eps: float = 1e-7) -> torch.Tensor:
    """Elementwise IoU (or GIoU) of broadcastable xyxy boxes [..., 4]."""
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = iw * ih
    aa = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    ab = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    union = aa + ab - inter + eps
    iou = inter / union
    if not giou:
        return iou
    cw = torch.maximum(a[..., 2], b[..., 2]) - torch.minimum(a[..., 0], b[..., 0])
    ch = torch.maximum(a[..., 3], b[..., 3]) - torch.minimum(a[..., 1], b[..., 1])
    c = cw * ch + eps
    return iou - (c - union) / c


def detection_loss(feats: list[tuple[torch.Tensor, torch.Tensor]], gt_boxes: torch.Tensor, gt_cls: torch.Tensor,
                   gt_mask: torch.Tensor, topk: int = 10, alpha: float = 0.5, beta: float = 6.0
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    pts, strides = make_anchors(feats)
    raw, logits = flatten(feats)
    pred = decode(raw, pts, strides)  # [B, N, 4]
    B, N, _ = pred.shape
    M = gt_boxes.shape[1]
    if M == 0:
        loss_cls = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="sum") / 1.0
        return loss_cls, {"cls": loss_cls.item(), "box": 0.0}
    with torch.no_grad():
        scores = logits.sigmoid()
        ious = box_iou(pred[:, None, :, :], gt_boxes[:, :, None, :]).clamp(min=0)  # [B, M, N]
        s = scores.gather(2, gt_cls.clamp(min=0)[:, None, :].expand(B, N, M)).transpose(1, 2)  # [B, M, N]
        inside = ((pts[None, None, :, 0] > gt_boxes[..., 0, None]) & (pts[None, None, :, 0] < gt_boxes[..., 2, None])
                  & (pts[None, None, :, 1] > gt_boxes[..., 1, None]) & (pts[None, None, :, 1] < gt_boxes[..., 3, None]))
        gc = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # [B, M, 2]
        dist = (pts[None, None] - gc[:, :, None]).abs().amax(-1)  # [B, M, N]
        near = dist < 1.5 * strides[None, None]
        cand = (inside | near) & gt_mask[..., None]
        align = s.pow(alpha) * ious.pow(beta)
        metric = torch.where(cand, align + 1e-9, torch.zeros_like(align))
        k = min(topk, N)
        top = metric.topk(k, dim=-1).indices
        sel = torch.zeros_like(cand).scatter_(-1, top, True) & cand  # [B, M, N]
        # an anchor picked by several GTs goes to the one it overlaps most
        multi = sel.sum(1) > 1  # [B, N]
        if multi.any():
            best = ious.argmax(1)  # [B, N]
            one = F.one_hot(best, M).transpose(1, 2).bool()
            sel = torch.where(multi[:, None, :], one & sel, sel)
        fg = sel.any(1)  # [B, N]
        gt_idx = sel.float().argmax(1)  # [B, N]
        am = align * sel
        pos_align = am.amax(-1, keepdim=True)
        pos_iou = (ious * sel).amax(-1, keepdim=True)
        norm = (am * pos_iou / (pos_align + 1e-9)).amax(1)  # [B, N]
        t_cls = gt_cls.gather(1, gt_idx).clamp(min=0)
        target = torch.zeros_like(logits)
        target.scatter_(2, t_cls[..., None], norm[..., None])
        target *= fg[..., None]
        t_box = gt_boxes.gather(1, gt_idx[..., None].expand(B, N, 4))
    tsum = max(float(target.sum()), 1.0)
    loss_cls = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / tsum
    if fg.any():
        w = target.sum(-1)[fg]
        giou = box_iou(pred[fg], t_box[fg], giou=True)
        loss_box = ((1.0 - giou) * w).sum() / tsum
    else:
        loss_box = pred.sum() * 0.0
    loss = loss_cls + 5.0 * loss_box
    return loss, {"cls": loss_cls.item(), "box": loss_box.item()}


# --------------------------------------------------------------------------------------------------
# data


def letterbox_geometry(src_w: int, src_h: int, dst_w: int, dst_h: int) -> tuple[int, int, int, int, float]:
    """(new_w, new_h, left, top, scale) as Ultralytics LetterBox computes them."""
    r = min(dst_h / src_h, dst_w / src_w)
    new_w, new_h = round(src_w * r), round(src_h * r)
    dw, dh = (dst_w - new_w) / 2, (dst_h - new_h) / 2
    return new_w, new_h, round(dw - 0.1), round(dh - 0.1), r


def make_sample(seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One training still, resized like the letterbox (not padded): RGB uint8 [h, w, 3], boxes [n, 5]."""
    rng = np.random.default_rng([seed, index])
    variant = str(rng.choice(["standard", "standard", "dim", "bright"]))
    img, objs = scenes.render_scene(rng, 640, 360, variant)
    if rng.random() < 0.6:  # compression artifacts, like the decoded videos
        q = int(rng.integers(25, 90))
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])
        if ok:
            img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    nw, nh, _, _, r = letterbox_geometry(640, 360, size, size)
    small = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)[:, :, ::-1].copy()
    boxes = np.array([[o["class_id"], *o["box"]] for o in objs], np.float32).reshape(-1, 5)
    boxes[:, 1:] *= r
    return small, boxes


def build_dataset(seed: int, count: int, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    data = []
    t0 = time.time()
    for i in range(count):
        data.append(make_sample(seed, i, size))
        if (i + 1) % 500 == 0:
            print(f"  data {i + 1}/{count} ({time.time() - t0:.0f}s)", flush=True)
    return data


def make_batch(data: list[tuple[np.ndarray, np.ndarray]], idx: np.ndarray, rng: np.random.Generator,
               size: int, height: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad each resized image into a size x height canvas (114 grey) at a random vertical offset,
    flip at random; returns images [B, 3, height, size] and padded GT."""
    imgs = np.full((len(idx), height, size, 3), 114, np.uint8)
    gts = []
    for j, i in enumerate(idx):
        img, boxes = data[int(i)]
        b = boxes.copy()
        if rng.random() < 0.5:
            img = img[:, ::-1]
            b[:, [1, 3]] = img.shape[1] - b[:, [3, 1]]
        if rng.random() < 0.5:
            img = img[::-1]
            b[:, [2, 4]] = img.shape[0] - b[:, [4, 2]]
        h = img.shape[0]
        top = int(rng.integers(0, height - h + 1))
        imgs[j, top:top + h, : img.shape[1]] = img
        b[:, [2, 4]] += top
        gts.append(b)
    m = max([1, *(len(g) for g in gts)])
    gt_boxes = torch.zeros(len(idx), m, 4)
    gt_cls = torch.full((len(idx), m), -1, dtype=torch.long)
    for j, g in enumerate(gts):
        if len(g):
            gt_boxes[j, : len(g)] = torch.from_numpy(g[:, 1:])
            gt_cls[j, : len(g)] = torch.from_numpy(g[:, 0]).long()
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(255.0)
    return x, gt_boxes, gt_cls, gt_cls >= 0


# --------------------------------------------------------------------------------------------------
# export


def export_onnx(net: DemoDet, out: Path, size: int, version: str, extra: dict[str, str] | None = None) -> Path:
    import copy

    import onnx

    model = copy.deepcopy(net).eval().fuse()
    wrapper = Exported(model, size).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(1, 3, size, size)
    kwargs: dict[str, Any] = {"input_names": ["images"], "output_names": ["output0"], "opset_version": 17,
                              "do_constant_folding": True}
    try:
        torch.onnx.export(wrapper, (dummy,), str(out), dynamo=False, **kwargs)
    except TypeError:  # older torch without the dynamo argument
        torch.onnx.export(wrapper, (dummy,), str(out), **kwargs)
    m = onnx.load(str(out))
    meta = {
        "description": "edge-agent demo detector (conveyor parts and defects), trained on synthetic scenes",
        "author": "edge-agent project",
        "license": "Apache-2.0",
        "version": version,
        "task": "detect",
        "stride": str(max(STRIDES) * 2),
        "batch": "1",
        "imgsz": f"[{size}, {size}]",
        "names": repr(dict(enumerate(scenes.LABELS))),
    }
    meta.update(extra or {})
    del m.metadata_props[:]
    for k, v in meta.items():
        p = m.metadata_props.add()
        p.key, p.value = k, v
    m.producer_name = "edge-agent/scripts/train_demo.py"
    m.producer_version = version
    onnx.checker.check_model(m)
    onnx.save(m, str(out))
    return out


def convert_fp16(src: Path, out: Path) -> Path:
    """fp16 weights and compute, float32 IO (Cast nodes at the edges), metadata kept."""
    import onnx
    from onnxconverter_common import float16

    m16 = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.checker.check_model(m16)
    onnx.save(m16, str(out))
    return out


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--images", type=int, default=2400, help="synthetic training stills")
    ap.add_argument("--iters", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--size", type=int, default=IMGSZ, help="export input size (square)")
    ap.add_argument("--train-height", type=int, default=224, help="canvas height used in training")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init", type=Path, help="start from this checkpoint (.pt) - fine-tuning")
    ap.add_argument("--version", default="1")
    ap.add_argument("--out", type=Path, default=Path("agent/data/demo/model.onnx"))
    ap.add_argument("--ckpt", type=Path, help="checkpoint path (default: --out with .pt)")
    ap.add_argument("--fp16-from", type=Path, help="no training: convert this model to fp16 into --out")
    args = ap.parse_args(argv)
    if args.fp16_from:
        convert_fp16(args.fp16_from, args.out)
        print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
        return 0

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng([args.seed, 1])
    t0 = time.time()
    print(f"building {args.images} synthetic stills (seed {args.seed})", flush=True)
    data = build_dataset(args.seed, args.images, args.size)
    net = DemoDet()
    if args.init:
        net.load_state_dict(torch.load(args.init, map_location="cpu"))
    nparams = sum(p.numel() for p in net.parameters())
    print(f"params {nparams}, data built in {time.time() - t0:.0f}s", flush=True)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=5e-4)
    warm = min(200, args.iters // 10)

    def lr_at(it: int) -> float:
        if it < warm and not args.init:
            return args.lr * (it + 1) / warm
        return args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * it / args.iters)))

    net.train()
    order = rng.permutation(len(data))
    pos = 0
    t1 = time.time()
    run: dict[str, float] = {"cls": 0.0, "box": 0.0}
    for it in range(args.iters):
        if pos + args.batch > len(order):
            order, pos = rng.permutation(len(data)), 0
        idx = order[pos:pos + args.batch]
        pos += args.batch
        x, gb, gc, gm = make_batch(data, idx, rng, args.size, args.train_height)
        for g in opt.param_groups:
            g["lr"] = lr_at(it)
        loss, parts = detection_loss(net(x), gb, gc, gm)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
        opt.step()
        for k, v in run.items():
            run[k] = 0.98 * v + 0.02 * parts[k] if it else parts[k]
        if (it + 1) % 100 == 0:
            el = time.time() - t1
            print(f"it {it + 1}/{args.iters} cls {run['cls']:.3f} box {run['box']:.3f} "
                  f"lr {lr_at(it):.5f} {el:.0f}s (eta {el / (it + 1) * (args.iters - it - 1):.0f}s)", flush=True)
    ckpt = args.ckpt or args.out.with_suffix(".pt")
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), ckpt)
    export_onnx(net, args.out, args.size, args.version)
    print(f"done in {time.time() - t0:.0f}s: {args.out} ({args.out.stat().st_size} bytes), params {nparams}, "
          f"checkpoint {ckpt}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
