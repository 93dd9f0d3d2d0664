"""What a fine-tuning checkpoint costs: its size and write time for a config's network (AdamW state included), and
the overhead at `finetune.checkpoint_minutes` (the default: every 10 minutes of a cell's wall-clock time).

Usage: python benchmarks/checkpoint_cost.py [--configfile configs/paper.yaml] [--classes 3] [--repeats 3]
       [--dir DIR]   (write the checkpoints on DIR: the file system the cells' results live on)

The overhead is the write time over the interval (a cell checkpoints once per interval); as steps: the steps one
write costs at a given step time (e.g. --step-ms 79, the paper config's fine-tuning step on one H200).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from ctssl.config import load_config
from ctssl.models.backbone import SegmentationNet
from ctssl.train.checkpoint import save_checkpoint
from ctssl.train.finetune import optimizer_and_schedule

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configfile", type=Path, default=ROOT / "configs" / "paper.yaml")
    parser.add_argument("--classes", type=int, default=3, help="output classes, background included")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--step-ms", type=float, default=79.0, help="a fine-tuning step's time, for the step count")
    args = parser.parse_args()
    config = load_config(args.configfile)
    ft = config["finetune"]
    net = SegmentationNet(config["model"], n_classes=args.classes)
    optimizer, scheduler, params = optimizer_and_schedule(net, ft)
    loss = sum(p.sum() for p in params)  # one step, so that AdamW holds its two moments per parameter
    loss.backward()
    optimizer.step()
    modules = {"model": net, "optimizer": optimizer, "scheduler": scheduler}
    log_rows = [{"step": str(i), "loss": "0.1"} for i in range(20000)]  # a full run's train_log rows
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "checkpoints" / "last.pt"
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            save_checkpoint(path, 1, "fp", modules, log_rows)
            times.append(time.perf_counter() - t0)
        size = path.stat().st_size
    seconds = statistics.median(times)
    interval = float(ft["checkpoint_minutes"]) * 60
    n_params = sum(p.numel() for p in net.parameters())
    print(f"config {args.configfile.name}: {n_params / 1e6:.1f} M parameters, checkpoint {size / 1e6:.0f} MB, "
          f"write {seconds:.2f} s (median of {args.repeats})")
    if interval:
        print(f"checkpoint_minutes {ft['checkpoint_minutes']}: overhead {100 * seconds / interval:.2f} % of a cell's "
              f"time; one write = {1000 * seconds / args.step_ms:.0f} steps of {args.step_ms:g} ms")
    else:
        print("checkpoint_minutes 0: no periodic checkpoint")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
