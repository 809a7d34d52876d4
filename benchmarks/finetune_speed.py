"""Fine-tuning throughput: featx finetune against a seed-S2-style loop (torchvision ImageFolder,
ToTensor + Normalize, fp32, batch 32, SGD momentum 0.9), same backbone, same unfrozen blocks, same
images and device, one epoch each, in one run.

    python benchmarks/finetune_speed.py --backbone efficientnet_lite0 --data ../shared/data/hymenoptera --unfreeze top

--repeat N links every file N times into a scratch copy, so a GPU epoch is long enough to time.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

import featx
from common import machine, parser, replicate
from featx.devices import keep_freed_memory, resolve_device
from featx.finetuning.training import finetune


def seed_loop(backbone: str, weights: str | None, root: Path, unfreeze: list, device: torch.device,
              workers: int) -> float:
    """The tutorial recipe: freeze everything, unfreeze the same blocks, new fc, fp32, contiguous."""
    net = featx.create_backbone(backbone, weights=weights)
    for p in net.model.parameters():
        p.requires_grad_(False)
    params = [p for b in unfreeze for p in net.block_parameters(b)]
    for p in params:
        p.requires_grad_(True)
    classes = len([d for d in (root / "train").iterdir() if d.is_dir()])
    model = nn.Sequential(net, nn.Linear(net.spec.feature_dim, classes)).to(device)
    pre = net.preprocess
    tf = transforms.Compose([
        transforms.RandomResizedCrop(pre.input_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(pre.mean, pre.std)])
    loader = DataLoader(datasets.ImageFolder(str(root / "train"), tf), batch_size=32, shuffle=True,
                        num_workers=workers)
    opt = torch.optim.SGD(params + list(model[1].parameters()), lr=1e-3, momentum=0.9)
    model.train()
    n, start = 0, time.perf_counter()
    for x, y in loader:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
        opt.step()
        n += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = parser()
    ap.add_argument("--unfreeze", default="top")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="set malloc's thresholds as the featx CLI does (devices.keep_freed_memory), for both loops")
    args = ap.parse_args()
    if args.keep_freed_memory and not keep_freed_memory():
        raise SystemExit("--keep-freed-memory needs glibc")
    device = resolve_device(args.device)
    blocks = args.unfreeze.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data)
        if args.repeat > 1:
            root = replicate(root, Path(tmp) / "data", args.repeat)
        seed_rate = seed_loop(args.backbone, args.weights, root, blocks, device, args.seed_workers)
        m = finetune(args.backbone, str(root), args.unfreeze, epochs=1, out=Path(tmp) / "run", device=args.device,
                     weights=args.weights, optimizer="sgd", head="none", cache_dir=Path(tmp) / "cache",
                     progress=False)
    featx_rate = m["history"][0]["train_img_per_s"]
    result = {"backbone": args.backbone, "unfreeze": blocks, "device": str(device),
              "machine": machine(device),
              "seed_train_img_per_s": round(seed_rate, 1), "featx_train_img_per_s": round(featx_rate, 1),
              "ratio": round(featx_rate / seed_rate, 2), "keep_freed_memory": args.keep_freed_memory}
    print(f"seed-S2 loop: {seed_rate:.1f} train img/s; featx finetune: {featx_rate:.1f} train img/s; "
          f"ratio {result['ratio']}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
