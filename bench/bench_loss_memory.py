"""Contrastive-loss memory and time against the global batch, at a fixed local batch:
the local-loss path (each rank scores its B rows against the W*B gathered columns, what
the trainer runs) against the full-matrix path ((W*B)^2 logits on every rank).

    python -m bench.bench_loss_memory [--local-batch 512] [--worlds 1,2,4,8,16] [--dim 512]

A world of W ranks is emulated in one process: this rank's B features, the other ranks'
features as plain tensors (what the all-gather would return), forward + backward.
Memory is the rise of this process's resident high-water mark (VmHWM, reset before each
measurement through /proc/self/clear_refs): no CUDA allocator stats on CPU. Expected: the
local path grows linearly with W (B x W*B logits), the full path quadratically.
"""
from __future__ import annotations

import ctypes
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.cli import command_line
from pipeline.losses.contrastive import gathered_contrastive_loss

LIBC = ctypes.CDLL("libc.so.6")


def vm(field: str) -> int:
    """kB of a /proc/self/status field."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(local: int, world: int, dim: int, local_loss: bool) -> tuple[float, float]:
    g = torch.Generator().manual_seed(world)
    others_image = F.normalize(torch.randn((world - 1) * local, dim, generator=g), dim=-1)
    others_text = F.normalize(torch.randn((world - 1) * local, dim, generator=g), dim=-1)
    image = F.normalize(torch.randn(local, dim, generator=g), dim=-1).requires_grad_(True)
    text = F.normalize(torch.randn(local, dim, generator=g), dim=-1).requires_grad_(True)
    scale = torch.tensor([14.3], requires_grad=True)
    LIBC.malloc_trim(0)  # hand freed memory back, so that reuse cannot hide a rise
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = vm("VmRSS")
    start = time.perf_counter()
    all_image, all_text = torch.cat([image, others_image]), torch.cat([text, others_text])  # rank 0's gather
    loss = gathered_contrastive_loss(image, text, all_image, all_text, scale, rank=0, local_loss=local_loss)
    loss.backward()
    seconds = time.perf_counter() - start
    return (vm("VmHWM") - before) / 1024, seconds


def main(argv=None):
    parser = command_line("python -m bench.bench_loss_memory", __doc__, notes=False)
    parser.add_argument("--local-batch", type=int, default=512)
    parser.add_argument("--worlds", default="1,2,4,8,16")
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args(argv)
    rows = []
    measure(args.local_batch, 2, args.dim, True)  # warm-up: first-touch allocations, kernels
    for world in map(int, args.worlds.split(",")):
        local_mib, local_s = measure(args.local_batch, world, args.dim, True)
        full_mib, full_s = measure(args.local_batch, world, args.dim, False)
        rows.append({"world": world, "global_batch": world * args.local_batch, "local_mib": round(local_mib, 1),
                     "full_mib": round(full_mib, 1), "local_ms": round(local_s * 1000, 1), "full_ms": round(full_s * 1000, 1)})
    print(f"local batch {args.local_batch}, dim {args.dim}; peak RSS rise (MiB) and time of forward + backward")
    print(f"{'world':>5} {'global':>7} {'local MiB':>10} {'full MiB':>9} {'local ms':>9} {'full ms':>8}")
    for r in rows:
        print(f"{r['world']:5d} {r['global_batch']:7d} {r['local_mib']:10.1f} {r['full_mib']:9.1f} "
              f"{r['local_ms']:9.1f} {r['full_ms']:8.1f}")
    # Growth over the last step of worlds, where the logits dominate the fixed overheads.
    before, last = rows[-2], rows[-1]
    growth = last["world"] / before["world"]
    summary = {"world_growth": growth, "local_mib_growth": round(last["local_mib"] / max(before["local_mib"], 1e-3), 2),
               "full_mib_growth": round(last["full_mib"] / max(before["full_mib"], 1e-3), 2)}
    print(f"world {before['world']} -> {last['world']}: local-loss memory x{summary['local_mib_growth']}, full-matrix "
          f"memory x{summary['full_mib_growth']} (linear would be x{growth:.0f}, quadratic x{growth ** 2:.0f})")
    print(json.dumps({"local_batch": args.local_batch, "dim": args.dim, "rows": rows, "summary": summary}))
    return rows, summary


if __name__ == "__main__":
    main()
