"""`python -m pipeline.model NAME [NAME ...]`: parameter table of named models.

The last line is `total_params=<int>` (of the last model named) for scripts to read.
"""
from __future__ import annotations

from pipeline.cli import command_line
from pipeline.model import MODEL_CONFIGS, build_model


def main(argv: list[str] | None = None):
    parser = command_line("python -m pipeline.model", __doc__, notes=False)
    parser.add_argument("names", nargs="+", metavar="NAME", help=f"one of: {', '.join(MODEL_CONFIGS)}")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in MODEL_CONFIGS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; known: {', '.join(MODEL_CONFIGS)}")
    rows = ["total", "shared", "vision_only", "text_only", "other", "vision_tower", "text_tower"]
    counts = {name: build_model(name).parameter_counts() for name in args.names}
    width = max(len(n) for n in args.names) + 2
    print(f"{'parameters':<14}" + "".join(f"{n:>{width + 4}}" for n in args.names))
    for row in rows:
        print(f"{row:<14}" + "".join(f"{counts[n][row] / 1e6:>{width}.2f} M  " for n in args.names))
    shared_frac = {n: c["shared"] / c["total"] for n, c in counts.items()}
    print(f"{'shared frac':<14}" + "".join(f"{shared_frac[n]:>{width + 3}.1%} " for n in args.names))
    print(f"total_params={counts[args.names[-1]]['total']}")


if __name__ == "__main__":
    main()
