"""Weights the field already has, in and out: OpenAI CLIP and open_clip state dicts to
our export format and back (issue 15).

OpenAI's `clip/model.py` and open_clip's `CLIP` (open_clip/model.py, transformer.py)
share one state-dict layout, which ours follows block for block (pipeline/model/layers.py):
the differences are names (`transformer.resblocks.N` vs `text.blocks.N`, `visual.conv1`
vs `visual.stem.conv`, `attn.in_proj_*` vs `attn.qkv.*`), the top-level text tower, and
`logit_scale`'s shape (a scalar there, (1,) here: see SharedCLIP). A state dict does not
say which activation it was trained with (OpenAI and open_clip's `-quickgelu` models:
QuickGELU; open_clip's LAION models: nn.GELU), so the source model is named and its
open_clip model config, shipped in the open_clip package, gives widths, layers and the
activation.

Files are read weights-only: a `.pt`/`.bin` through torch's weights-only unpickler, a
`.safetensors` through safetensors. A file that would need code to load (a pickle with
objects, OpenAI's TorchScript archives) is refused with one line.
"""
from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch

from pipeline.model import build_model
from pipeline.model.configs import NORMALIZATION, ModelArch, resolve_arch
from pipeline.weights.export import load_exported
from pipeline.weights.files import file_sha256


class InteropError(ValueError):
    """A file or model that cannot be converted; the message is one line."""


class UntrustedFileError(InteropError):
    pass


# ---- reading files ----------------------------------------------------------------------

def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, without running anything in it. Accepts a plain state
    dict, a training checkpoint holding one under "state_dict" (open_clip's), DDP's
    "module." prefix, and safetensors."""
    path = Path(path)
    if not path.is_file():
        raise InteropError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    if is_torchscript(path):
        raise UntrustedFileError(
            f"{path}: a TorchScript archive (OpenAI's released .pt files are): its tensors load only by running its "
            f"code, so it is refused; use the same weights as a state dict or safetensors (open_clip publishes "
            f"OpenAI's models as 'open_clip_pytorch_model.bin' / '.safetensors' on the Hugging Face hub)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # the weights-only unpickler met an object (torch's message suggests
        # weights_only=False, the one setting that would run it: not repeated here)
        raise UntrustedFileError(f"{path}: refused, it holds objects that would run code when loaded (only "
                                 f"tensors are read from checkpoints)") from None
    except Exception as e:  # noqa: BLE001 (a truncated or foreign file: torch raises RuntimeError and others)
        raise InteropError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise InteropError(f"{path}: no state dict of tensors in it")
    if payload and all(k.startswith("module.") for k in payload):
        payload = {k[len("module."):]: v for k, v in payload.items()}
    return payload


def is_torchscript(path: Path) -> bool:
    """TorchScript archives are zips with a code/ folder (torch.save's zips have none)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in name or name.startswith("code/") for name in z.namelist())


# ---- open_clip's model configs -------------------------------------------------------------

# The open_clip config fields our ViT expresses; anything else (timm/HF towers, attentional
# pooling, SigLIP's bias, layer scale, no ln_pre, ...) changes the computation: refused.
_VISION_FIELDS = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio", "patch_dropout"}
_TEXT_FIELDS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
_TOP_FIELDS = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}


def open_clip_arch(source: str) -> dict:
    """Our architecture fields for open_clip model `source` (e.g. "ViT-B-32",
    "ViT-B-32-quickgelu"), from the model config open_clip ships."""
    import open_clip
    cfg = open_clip.get_model_config(source)
    if cfg is None:
        raise InteropError(f"--source {source}: not an open_clip model name (open_clip.list_models() has them)")
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    extra = sorted({*(set(cfg) - _TOP_FIELDS), *(f"vision_cfg.{k}" for k in set(vision) - _VISION_FIELDS),
                    *(f"text_cfg.{k}" for k in set(text) - _TEXT_FIELDS)})
    if extra or not isinstance(vision.get("layers"), int):
        raise InteropError(f"--source {source}: open_clip config fields this architecture does not express: "
                           f"{', '.join(extra) or 'vision_cfg.layers (per-stage: a ResNet)'}")
    if vision.get("mlp_ratio", 4.0) != text.get("mlp_ratio", 4.0):
        raise InteropError(f"--source {source}: different MLP ratios per tower are not expressed here")
    return dict(embed_dim=cfg["embed_dim"], image_size=vision["image_size"], patch_size=vision["patch_size"],
                vision_width=vision["width"], vision_layers=vision["layers"],
                vision_heads=vision["width"] // vision.get("head_width", 64),
                text_width=text["width"], text_layers=text["layers"], text_heads=text["heads"],
                context_length=text["context_length"], vocab_size=text["vocab_size"],
                mlp_ratio=float(vision.get("mlp_ratio", 4.0)),
                activation="quick_gelu" if cfg.get("quick_gelu") else "gelu",
                share="none", ln_eps=1e-5, normalization="clip")


def open_clip_name(arch: ModelArch) -> str:
    """The open_clip model name whose config builds `arch` (for `create_model`)."""
    import open_clip
    for name in open_clip.list_models():
        try:
            if resolve_arch(arch, open_clip_arch(name)) == arch:
                return name
        except (InteropError, ValueError):
            continue
    raise InteropError(f"no open_clip model config matches this architecture ({arch.vision_width} wide, "
                       f"{arch.vision_layers} layers, patch {arch.patch_size}, {arch.activation})")


# ---- key mapping -------------------------------------------------------------------------------

# (open_clip / OpenAI name, ours), as regular expressions over whole keys
_RENAMES = [
    (r"visual\.conv1\.weight", r"visual.stem.conv.weight"),
    (r"visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", r"visual.blocks.\1.attn.qkv.\2"),
    (r"visual\.transformer\.resblocks\.(\d+)\.(.+)", r"visual.blocks.\1.\2"),
    (r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", r"text.blocks.\1.attn.qkv.\2"),
    (r"transformer\.resblocks\.(\d+)\.(.+)", r"text.blocks.\1.\2"),
    (r"(positional_embedding|text_projection|ln_final\..+|token_embedding\..+)", r"text.\1"),
    (r"(visual\..+|logit_scale)", r"\1"),
]
# OpenAI's state dicts carry the model's sizes as tensors beside the weights
_OPENAI_SIZES = ("input_resolution", "context_length", "vocab_size")


def _rename(key: str, table: list[tuple[str, str]]) -> str | None:
    for pattern, replacement in table:
        if re.fullmatch(pattern, key):
            return re.sub(f"^{pattern}$", replacement, key)
    return None


def _map_keys(state_dict: dict[str, torch.Tensor], ours_for) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename every key with `ours_for` (None: it maps to nothing); returns (mapped,
    unexpected), in the file's order."""
    mapped, unexpected = {}, []
    for key, value in state_dict.items():
        if key in _OPENAI_SIZES:
            continue
        ours = ours_for(key)
        if ours is None:
            unexpected.append(key)
            continue
        mapped[ours] = value.reshape(1) if ours == "logit_scale" else value
    return mapped, unexpected


def from_open_clip(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """open_clip / OpenAI names -> ours; returns (mapped, keys that map to nothing)."""
    return _map_keys(state_dict, lambda key: _rename(key, _RENAMES))


# The released MS-CLIP checkpoints: state dicts of the reference `CLIP`
# (Hxyou/MSCLIP lib/models/clip_openai_pe_res_v1.py). With Early Specialization its
# visual resblocks.0 is the conv stem (`EarlyconvRes`: conv1/bn1, then `ResBasicBlock_v0`
# stages whose 3x3 conv is conv1/bn1 and whose 1x1 shortcut is downsample.0/1), so its
# visual resblocks.i is our visual.blocks.(i - 1); the parallel branch is
# parallel_branch_v (stage 0 conv/bn, then `ConvResBlock`s) and the lateral adapters
# parallel_lateral_adapter.
_MSCLIP_VISUAL = [
    (r"resblocks\.0\.conv1\.weight", r"stem.conv1.0.0.weight"),
    (r"resblocks\.0\.bn1\.(.+)", r"stem.conv1.0.1.\1"),
    (r"resblocks\.0\.resnet_stage\.conv_(\d+)\.conv1\.weight", r"stem.stages.\1.conv3.0.weight"),
    (r"resblocks\.0\.resnet_stage\.conv_(\d+)\.bn1\.(.+)", r"stem.stages.\1.conv3.1.\2"),
    (r"resblocks\.0\.resnet_stage\.conv_(\d+)\.downsample\.([01])\.(.+)", r"stem.stages.\1.conv1.\2.\3"),
    (r"resblocks\.0\.last_conv\.weight", r"stem.last_conv.weight"),
    (r"parallel_branch_v\.0\.conv\.weight", r"branch.stages.0.0.0.weight"),
    (r"parallel_branch_v\.0\.bn\.(.+)", r"branch.stages.0.0.1.\1"),
    (r"parallel_branch_v\.(\d+)\.resnet_stage\.conv_0\.conv1\.weight", r"branch.stages.\1.body.0.0.weight"),
    (r"parallel_branch_v\.(\d+)\.resnet_stage\.conv_0\.bn1\.(.+)", r"branch.stages.\1.body.0.1.\2"),
    (r"parallel_branch_v\.(\d+)\.resnet_stage\.conv_0\.conv2\.weight", r"branch.stages.\1.body.2.0.weight"),
    (r"parallel_branch_v\.(\d+)\.resnet_stage\.conv_0\.bn2\.(.+)", r"branch.stages.\1.body.2.1.\2"),
    (r"parallel_branch_v\.(\d+)\.resnet_stage\.conv_0\.conv3\.weight", r"branch.stages.\1.body.4.0.weight"),
    (r"parallel_branch_v\.(\d+)\.resnet_stage\.conv_0\.bn3\.(.+)", r"branch.stages.\1.body.4.1.\2"),
    (r"parallel_branch_v\.(\d+)\.resnet_stage\.conv_0\.residual_conv\.weight", r"branch.stages.\1.shortcut.0.weight"),
    (r"parallel_branch_v\.(\d+)\.resnet_stage\.conv_0\.residual_bn\.(.+)", r"branch.stages.\1.shortcut.1.\2"),
    (r"parallel_lateral_adapter\.(\d+)\.top2bottom_dw_conv\.conv\.weight", r"adapters.\1.to_grid.0.0.weight"),
    (r"parallel_lateral_adapter\.(\d+)\.top2bottom_dw_conv\.bn\.(.+)", r"adapters.\1.to_grid.0.1.\2"),
    (r"parallel_lateral_adapter\.(\d+)\.top2bottom_pw_conv\.conv\.weight", r"adapters.\1.to_grid.1.weight"),
    (r"parallel_lateral_adapter\.(\d+)\.bottom_dw_conv\.conv\.weight", r"adapters.\1.token_dw.0.weight"),
    (r"parallel_lateral_adapter\.(\d+)\.bottom_dw_conv\.bn\.(.+)", r"adapters.\1.token_dw.1.\2"),
    (r"parallel_lateral_adapter\.(\d+)\.ln_adapt\.(.+)", r"adapters.\1.ln.\2"),
]


def from_msclip(state_dict: dict[str, torch.Tensor], arch: ModelArch) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The reference MS-CLIP names -> ours for `arch` (its early_conv_stem shifts the
    visual block numbering); returns (mapped, keys that map to nothing). A tensor the
    reference shares between the towers appears under both names, as in ours."""
    first = 1 if arch.early_conv_stem else 0
    convs = [(f"visual\\.transformer\\.{p}", f"visual.{r}") for p, r in _MSCLIP_VISUAL] if first else []

    def ours_for(key: str) -> str | None:
        conv = _rename(key, convs)
        if conv is not None:
            return conv
        block = re.fullmatch(r"visual\.transformer\.resblocks\.(\d+)\.(.+)", key)
        if block:  # the stem was layer 0: the reference's block i is our block i - first
            if int(block.group(1)) < first:
                return None
            key = f"visual.transformer.resblocks.{int(block.group(1)) - first}.{block.group(2)}"
        return _rename(key, _RENAMES)
    return _map_keys(state_dict, ours_for)


def to_open_clip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> open_clip names (plain CLIP models only: one tower each, nothing shared)."""
    back = [(r"visual\.stem\.conv\.weight", r"visual.conv1.weight"),
            (r"visual\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"visual.transformer.resblocks.\1.attn.in_proj_\2"),
            (r"visual\.blocks\.(\d+)\.(.+)", r"visual.transformer.resblocks.\1.\2"),
            (r"text\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"transformer.resblocks.\1.attn.in_proj_\2"),
            (r"text\.blocks\.(\d+)\.(.+)", r"transformer.resblocks.\1.\2"),
            (r"text\.(.+)", r"\1"), (r"(visual\..+|logit_scale)", r"\1")]
    out = {}
    for key, value in state_dict.items():
        name = _rename(key, back)
        if name is None:
            raise InteropError(f"{key}: no open_clip counterpart")
        out[name] = value.reshape(()) if name == "logit_scale" else value
    return out


# ---- import / export -----------------------------------------------------------------------------

def key_report(model: torch.nn.Module, mapped: dict, unexpected: list[str]) -> dict:
    own = model.state_dict()
    missing = sorted(set(own) - set(mapped))
    unexpected = sorted(unexpected + [k for k in mapped if k not in own])
    shapes = sorted(f"{k}: {tuple(mapped[k].shape)} vs ours {tuple(own[k].shape)}"
                    for k in mapped if k in own and mapped[k].shape != own[k].shape)
    return {"mapped": len(set(mapped) & set(own)), "missing": missing, "unexpected": unexpected, "shapes": shapes}


def describe(report: dict) -> str:
    parts = [f"{report['mapped']} mapped", f"{len(report['missing'])} missing", f"{len(report['unexpected'])} unexpected"]
    for kind in ("missing", "unexpected", "shapes"):
        if report[kind]:
            parts.append(f"{kind}: {', '.join(report[kind][:5])}{' ...' if len(report[kind]) > 5 else ''}")
    return "; ".join(parts)


def import_weights(path: str | Path, fmt: str, model_name: str, source: str | None = None,
                   allow_partial: bool = False) -> tuple[dict, dict]:
    """(our export payload, key report) for a file in `fmt` (openai / open_clip)."""
    if fmt == "msclip":
        return _import_msclip(path, model_name, allow_partial)
    if fmt not in ("openai", "open_clip"):
        raise InteropError(f"--format {fmt}: this importer reads msclip, openai and open_clip files")
    if not source:
        raise InteropError("--source: name the open_clip model the file belongs to (ViT-B-32-quickgelu for OpenAI's "
                           "B/32, ViT-B-32 for LAION's): a state dict does not say which activation it was trained with")
    overrides = open_clip_arch(source)
    base = resolve_arch(model_name)
    arch = resolve_arch(base, overrides)
    if base.share != "none" or base.early_conv_stem:
        raise InteropError(f"--model {model_name}: an {fmt} file holds a plain CLIP; use a clip-* model")
    sizes = ("vision_width", "vision_layers", "vision_heads", "text_width", "text_layers", "text_heads", "embed_dim",
             "patch_size")
    differ = [f"{k} {getattr(base, k)} vs {getattr(arch, k)}" for k in sizes if getattr(base, k) != getattr(arch, k)]
    if differ:
        raise InteropError(f"--model {model_name} does not match --source {source}: {', '.join(differ)}")
    model = build_model(arch)
    report = _load_checked(model, *from_open_clip(read_state_dict(path)), path, allow_partial)
    return _payload(model, model_name, fmt, path, source), report


def _import_msclip(path, model_name: str, allow_partial: bool) -> tuple[dict, dict]:
    arch = resolve_arch(model_name)
    if arch.share == "none":
        raise InteropError(f"--model {model_name}: a released MS-CLIP checkpoint holds a shared model; use an msclip-* model")
    model = build_model(arch)
    report = _load_checked(model, *from_msclip(read_state_dict(path), arch), path, allow_partial)
    return _payload(model, model_name, "msclip", path, ""), report


def _load_checked(model: torch.nn.Module, mapped: dict, unexpected: list[str], path, allow_partial: bool) -> dict:
    """Load mapped weights into `model` after the key report allows it; returns the report."""
    report = key_report(model, mapped, unexpected)
    if report["shapes"] or (not allow_partial and (report["missing"] or report["unexpected"])):
        raise InteropError(f"{path}: {describe(report)}" + ("" if report["shapes"] else " (--allow-partial to load anyway)"))
    check_shared_copies_agree(model, mapped, path)  # nothing to check in a plain CLIP
    model.load_state_dict({k: v for k, v in mapped.items() if k in model.state_dict()}, strict=not allow_partial)
    return report


def check_shared_copies_agree(model: torch.nn.Module, mapped: dict, path) -> None:
    """Our towers share modules by object identity: a file whose two copies of one shared
    tensor differ cannot be loaded faithfully (one copy would silently win)."""
    names_by_tensor: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names_by_tensor.setdefault(id(tensor), []).append(name)
    for names in names_by_tensor.values():
        present = [n for n in names if n in mapped]
        if len(present) > 1 and any(not torch.equal(mapped[present[0]], mapped[n]) for n in present[1:]):
            raise InteropError(f"{path}: {present[0]} and {present[1]} are one shared tensor in this model but "
                               f"differ in the file (is --model's sharing the file's?)")


def _payload(model, model_name: str, fmt: str, path, source: str) -> dict:
    return {"state_dict": {k: v.float().contiguous() if v.is_floating_point() else v
                           for k, v in model.state_dict().items()},
            "model_name": model_name, "arch": _arch_dict(model.arch), "heads": {}, "similarity": "pooled",
            "source": {"format": fmt, "file": str(Path(path).resolve()), "sha256": file_sha256(path),
                       "open_clip_model": source}}


def _arch_dict(arch: ModelArch) -> dict:
    from pipeline.config import to_dict
    return to_dict(arch)


def open_clip_config(arch: ModelArch) -> dict:
    """open_clip's own description of `arch` (the `open_clip_config.json` of its hf-hub and
    local-dir layouts: `model_cfg` as open_clip's model configs spell it, `preprocess_cfg`
    as our eval transform: shortest side resized bicubic, centre crop, our normalization).
    Any plain CLIP size has one, not only open_clip's named configs."""
    if arch.share != "none" or arch.early_conv_stem or arch.parallel_branch or arch.roi_dim:
        raise InteropError("this model shares weights between its towers or has MS-CLIP's / PyramidCLIP's extra "
                           "parts; open_clip has no such model, so its export stays ours")
    if arch.ln_eps != 1e-5:  # open_clip's LayerNorms use torch's default
        raise InteropError(f"ln_eps {arch.ln_eps}: open_clip's LayerNorm eps is 1e-5")
    if arch.vision_width % arch.vision_heads:
        raise InteropError(f"vision_width {arch.vision_width} is not a multiple of vision_heads {arch.vision_heads}")
    mean, std = NORMALIZATION[arch.normalization]
    return {
        "model_cfg": {
            "embed_dim": arch.embed_dim,
            "quick_gelu": arch.activation == "quick_gelu",
            "vision_cfg": {"image_size": arch.image_size, "layers": arch.vision_layers, "width": arch.vision_width,
                           "patch_size": arch.patch_size, "head_width": arch.vision_width // arch.vision_heads,
                           "mlp_ratio": arch.mlp_ratio},
            "text_cfg": {"context_length": arch.context_length, "vocab_size": arch.vocab_size,
                         "width": arch.text_width, "heads": arch.text_heads, "layers": arch.text_layers,
                         "mlp_ratio": arch.mlp_ratio},
        },
        "preprocess_cfg": {"mean": list(mean), "std": list(std), "interpolation": "bicubic",
                           "resize_mode": "shortest"},
    }


OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS = "open_clip_config.json", "open_clip_model.safetensors"


def export_open_clip(exported: str | Path, output: str | Path) -> str:
    """Our export of a clip-* model -> open_clip. `output` a folder: open_clip's hf-hub
    layout (open_clip_config.json + open_clip_model.safetensors), for any plain CLIP size;
    returns `local-dir:<folder>`, the name open_clip.create_model_and_transforms (and
    CLIP_benchmark's --model) loads it by. `output` a .pt/.safetensors file: the weights
    alone, for a size one of open_clip's named configs builds; returns that name
    (`open_clip.create_model(name, pretrained=output)`)."""
    import json
    model, payload = load_exported(exported)
    try:
        config = open_clip_config(model.arch)
    except InteropError as e:
        raise InteropError(f"{exported}: {payload.get('model_name', 'this model')}: {e}") from None
    state_dict = {k: v.contiguous() for k, v in to_open_clip(model.state_dict()).items()}
    output = Path(output)
    if output.suffix in (".pt", ".pth", ".bin", ".safetensors"):
        name = open_clip_name(model.arch)
        output.parent.mkdir(parents=True, exist_ok=True)
        if output.suffix == ".safetensors":
            from safetensors.torch import save_file
            save_file(state_dict, str(output))
        else:
            torch.save(state_dict, output)
        return name
    from safetensors.torch import save_file
    output.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(output / OPEN_CLIP_WEIGHTS))
    (output / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return f"local-dir:{output.resolve()}"


# ---- starting a run from weights (model.init_from) -------------------------------------------------

def resize_positional_embedding(embedding: torch.Tensor, grid: int) -> torch.Tensor:
    """(1 + g*g, D) -> (1 + grid*grid, D): the CLS row kept, the patch rows resampled as
    an image, bicubic with antialiasing (open_clip's `resize_pos_embed`)."""
    import torch.nn.functional as F
    cls, patches = embedding[:1], embedding[1:]
    old = int(round(patches.shape[0] ** 0.5))
    if old * old != patches.shape[0]:
        raise InteropError(f"visual.positional_embedding: {patches.shape[0]} patch positions are not a square grid")
    image = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()  # (1, D, g, g)
    resized = F.interpolate(image, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([cls, resized.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(embedding.dtype)])


def initial_weights(path: str, fmt: str, source: str, arch: ModelArch) -> tuple[dict[str, torch.Tensor], str]:
    """`model.init_from`: the encoder weights of `path` for a model of `arch`, in our
    names, and a one-line report. `fmt` auto reads our exports (they carry "arch"), else a
    released MS-CLIP checkpoint when `arch` shares weights, else an open_clip / OpenAI
    state dict, which needs `source`. The activation must be the file's; a different image size or patch grid
    interpolates the position embedding."""
    if fmt in ("auto", "ours") and Path(path).suffix != ".safetensors":
        payload = _read_ours(path)
        if payload is not None:
            return _fit(payload["state_dict"], [], resolve_arch(payload["arch"]), arch, path)
        if fmt == "ours":
            raise InteropError(f"model.init_from: {path} is not one of our exports (no 'arch' and 'state_dict')")
    if fmt == "msclip" or (fmt == "auto" and arch.share != "none"):  # a shared model: MS-CLIP's layout
        mapped, unexpected = from_msclip(read_state_dict(path), arch)
        check_shared_copies_agree(build_model(arch), mapped, path)
        return _fit(mapped, unexpected, arch, arch, path)
    if not source:
        raise InteropError("model.init_from_source: name the open_clip model of an openai/open_clip file "
                           "(e.g. ViT-B-32-quickgelu)")
    mapped, unexpected = from_open_clip(read_state_dict(path))
    return _fit(mapped, unexpected, resolve_arch(arch, open_clip_arch(source)), arch, path)


def _read_ours(path: str) -> dict | None:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 (not ours, or unsafe: read_state_dict says which)
        read_state_dict(path)  # raises the one-line refusal for an unsafe file
        return None
    return payload if isinstance(payload, dict) and "arch" in payload and "state_dict" in payload else None


def _fit(state_dict: dict, unexpected: list[str], source_arch: ModelArch, arch: ModelArch,
         path: str) -> tuple[dict, str]:
    if source_arch.activation != arch.activation:
        raise InteropError(f"model.init_from: {path} was trained with {source_arch.activation}, the model uses "
                           f"{arch.activation}: set model.overrides.activation={source_arch.activation}")
    state_dict = dict(state_dict)
    note = ""
    key = "visual.positional_embedding"
    if key in state_dict and state_dict[key].shape[0] != arch.grid_size ** 2 + 1:
        old = state_dict[key].shape[0]
        state_dict[key] = resize_positional_embedding(state_dict[key], arch.grid_size)
        note = f"; {key} interpolated from {old} to {state_dict[key].shape[0]} positions (bicubic)"
    model = build_model(arch)
    report = key_report(model, state_dict, unexpected)
    if report["missing"] or report["unexpected"] or report["shapes"]:
        raise InteropError(f"model.init_from: {path}: {describe(report)}")
    return state_dict, f"{describe(report)}{note}"
