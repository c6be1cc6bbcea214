"""Weights in and out of the project:

    python -m pipeline.weights export --checkpoint runs/NAME/checkpoints [--tag step_00000200] --output model.pt
    python -m pipeline.weights export --format open_clip --checkpoint runs/NAME/model.pt --output DIR
    python -m pipeline.weights import --format openai|open_clip|msclip --input FILE --model NAME --output model.pt
"""
from __future__ import annotations

import sys
from pathlib import Path

from pipeline.cli import command_line
from pipeline.weights.export import export, save_atomically
from pipeline.weights.interop import InteropError, describe, export_open_clip, import_weights


def main(argv=None):
    parser = command_line("python -m pipeline.weights", __doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="consolidated fp32 weights for evaluation, or an export in open_clip's layout")
    ex.add_argument("--format", choices=("ours", "open_clip"), default="ours",
                    help="ours: from a run's checkpoints/; open_clip: from our export (model.pt) of a clip-* model")
    ex.add_argument("--checkpoint", required=True, help="a run's checkpoints/ directory (ours) or model.pt (open_clip)")
    ex.add_argument("--tag", help="e.g. step_00000200 (default: the newest complete one)")
    ex.add_argument("--output", required=True,
                    help="ours: a .pt file; open_clip: a folder (open_clip's hf-hub layout, any clip-* size), or a "
                         ".pt/.safetensors file of weights alone (sizes one of open_clip's named configs builds)")
    im = sub.add_parser("import", help="MS-CLIP / OpenAI / open_clip weights -> our export format (model.pt)")
    im.add_argument("--format", required=True, choices=("msclip", "openai", "open_clip"),
                    help="msclip: a released MS-CLIP checkpoint (Hxyou/MSCLIP state dict)")
    im.add_argument("--input", required=True, help="a state dict (.pt/.bin, read weights-only) or .safetensors")
    im.add_argument("--model", required=True, help="our model name (clip-b32, clip-b16, ...)")
    im.add_argument("--source", help="the open_clip model name of the file, e.g. ViT-B-32 or ViT-B-32-quickgelu")
    im.add_argument("--allow-partial", action="store_true", help="load even with missing or unexpected keys")
    im.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "import":
            payload, report = import_weights(args.input, args.format, args.model, args.source, args.allow_partial)
            save_atomically(payload, Path(args.output))
            print(f"keys: {describe(report)}\nwrote {args.output} ({args.model}, activation "
                  f"{payload['arch']['activation']})")
        elif args.format == "open_clip":
            name = export_open_clip(args.checkpoint, args.output)
            if name.startswith("local-dir:"):
                print(f"wrote {args.output}; load it with open_clip.create_model_and_transforms({name!r}); "
                      f"CLIP_benchmark: clip_benchmark eval --model {name} --pretrained '' ...")
            else:
                print(f"wrote {args.output}; load it with open_clip.create_model_and_transforms({name!r}, "
                      f"pretrained={args.output!r})")
        else:
            print(f"wrote {export(args.checkpoint, args.output, args.tag)}")
    except (InteropError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
