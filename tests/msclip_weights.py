"""Seeded stand-ins for released MS-CLIP weights, generated from names and shapes alone,
identically here and where tests/data/msclip_reference.json's outputs were computed
(the reference code, run once outside the project)."""
import zlib

import torch

CAPTIONS = ["a photo of a red bus on a street", "the handwritten digit three"]


def seeded_tensor(name: str, shape: list[int]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    if name.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.long)
    noise = torch.randn(shape, generator=generator)
    if name.endswith("running_var"):
        return 0.75 + 0.5 * torch.rand(shape, generator=generator)
    if len(shape) >= 2 and "token_embedding" not in name:
        fan_in = 1
        for n in shape[1:]:
            fan_in *= n
        return noise * fan_in ** -0.5
    if len(shape) == 1 and name.endswith(".weight"):  # LayerNorm / BatchNorm scales
        return 1 + 0.1 * noise
    return (0.02 if "token_embedding" in name else 0.1) * noise


def seeded_state_dict(shapes: dict[str, list[int]], shared: dict[str, str]) -> dict[str, torch.Tensor]:
    """One tensor per name; a name the reference shares with another gets that one's."""
    state = {name: seeded_tensor(name, shape) for name, shape in shapes.items() if name not in shared}
    state.update({name: state[original] for name, original in shared.items()})
    return state


def probe_inputs(context_length: int):
    from pipeline.tokenizer import get_tokenizer
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    return images, get_tokenizer()(CAPTIONS, context_length)
