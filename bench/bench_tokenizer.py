"""Tokenizer throughput: ours against open_clip's, same captions, same process.

    python -m bench.bench_tokenizer [--captions 20000] [--repeats 3]

Prints token ids per second for both and their ratio (ours / open_clip), on two
workloads: `varied` (the parity-test mix: prose, raw BPE words, noise, overlong) and
`prose` (real English sentences, closest to web captions). `cold` builds a fresh
tokenizer for every pass (empty word caches, as a new loader worker has); `warm`
re-tokenizes with caches filled. Runs alternate between the two tokenizers and the
best of `--repeats` is kept, so background load hits both alike. Asserts identical ids.
"""
from __future__ import annotations

import json
import time

import torch
from open_clip.tokenizer import SimpleTokenizer

from bench.captions import real_sentences, varied_captions
from pipeline.cli import command_line
from pipeline.tokenizer import ClipTokenizer


def best_rate(make, captions, repeats: int, warm: bool) -> tuple[float, torch.Tensor]:
    best, ids = 0.0, None
    tok = make()
    for _ in range(repeats):
        if not warm:
            tok = make()
        else:
            tok(captions)  # fill caches
        start = time.perf_counter()
        ids = tok(captions, context_length=77)
        elapsed = time.perf_counter() - start
        best = max(best, int((ids != 0).sum()) / elapsed)
    return best, ids


def main(argv=None) -> dict:
    parser = command_line("python -m bench.bench_tokenizer", __doc__, notes=False)
    parser.add_argument("--captions", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    workloads = {"varied": varied_captions(args.captions),
                 "prose": (real_sentences() * (args.captions // 1000 + 1))[: args.captions]}
    results = {}
    print(f"{'workload':<8} {'cache':<5} {'ours ids/s':>12} {'open_clip ids/s':>16} {'ratio':>7}")
    for name, captions in workloads.items():
        for warm in (False, True):
            ours, ours_ids = best_rate(ClipTokenizer, captions, args.repeats, warm)
            ref, ref_ids = best_rate(SimpleTokenizer, captions, args.repeats, warm)
            if not torch.equal(ours_ids, ref_ids):
                raise SystemExit(f"ids differ from open_clip on workload {name!r}")
            key = f"{name}/{'warm' if warm else 'cold'}"
            results[key] = {"ours_ids_per_s": ours, "open_clip_ids_per_s": ref, "ratio": ours / ref}
            print(f"{name:<8} {'warm' if warm else 'cold':<5} {ours:>12,.0f} {ref:>16,.0f} {ours / ref:>6.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
