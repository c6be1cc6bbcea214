"""Decode + train augmentation per CPU core: what one loader worker can feed, on
img2dataset-style JPEGs (256 x 256, quality 95: img2dataset's default image_size and
resize_mode "border"), one thread, best of --repeats.

    python -m bench.bench_decode [--images 200] [--image-size 224] [--repeats 3]

Paths, each from the JPEG's bytes to a 224 px training crop:
* decode: PIL's decode alone (the floor);
* ours: the loader's path, decode_sample + train_transform with uint8 output
  (data.uint8_batches: RandomResizedCrop, bicubic, then PILToTensor; the trainer
  normalizes on its device);
* ours_float: the same with ToTensor + Normalize in the worker (data.uint8_batches=false,
  open_clip's way);
* pillow_crop: the loader's path before it resized on the tensor (RandomResizedCrop on the
  PIL image with Pillow's bicubic, then PILToTensor): the before of "ours";
* torchvision_decode: torchvision.io.decode_jpeg to a uint8 tensor, then the same crop on
  the tensor, what a GPU decode path does on the device (no draft decoding, JPEG only).
Prints images/s per core for each, and the ratio of each to decode alone. A B/16 at 35% MFU
on an H100 needs ~2,800 images/s per GPU.
"""
from __future__ import annotations

import io
import json
import random
import time

import numpy as np
import torch
from PIL import Image

from pipeline.cli import command_line


def img2dataset_jpegs(count: int, size: int = 256, seed: int = 0) -> list[bytes]:
    """Random crops of scikit-learn's two sample photos as img2dataset writes them by
    default (resize_mode "border": the long side resized to 256, then padded
    to 256 x 256 with black; JPEG quality 95)."""
    from sklearn.datasets import load_sample_image
    rng = random.Random(seed)
    photos = [Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")]
    out = []
    for _ in range(count):
        photo = rng.choice(photos)
        w, h = photo.size
        cw, ch = rng.randint(w // 3, w), rng.randint(h // 3, h)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = photo.crop((x, y, x + cw, y + ch))
        scale = size / max(crop.size)
        crop = crop.resize((max(1, round(crop.size[0] * scale)), max(1, round(crop.size[1] * scale))), Image.BICUBIC)
        border = Image.new("RGB", (size, size))
        border.paste(crop, ((size - crop.size[0]) // 2, (size - crop.size[1]) // 2))
        buf = io.BytesIO()
        border.save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def paths(image_size: int) -> dict:
    from torchvision.io import decode_jpeg
    from torchvision.transforms import v2

    from pipeline.data.decode import decode_sample
    from pipeline.data.transforms import train_transform
    uint8, floats = train_transform(image_size, None), train_transform(image_size, "clip")
    from torchvision import transforms as T
    pillow_crop = T.RandomResizedCrop(image_size, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC)
    to_tensor = T.PILToTensor()
    tensor_crop = v2.RandomResizedCrop(image_size, scale=(0.9, 1.0), interpolation=v2.InterpolationMode.BICUBIC,
                                       antialias=True)

    def sample(data):
        return {"jpg": data, "txt": b"a photo"}
    return {
        "decode": lambda data: Image.open(io.BytesIO(data)).convert("RGB"),
        "ours": lambda data: uint8(decode_sample(sample(data), image_size)[0]),
        "ours_float": lambda data: floats(decode_sample(sample(data), image_size)[0]),
        "pillow_crop": lambda data: to_tensor(pillow_crop(decode_sample(sample(data), image_size)[0])),
        "torchvision_decode": lambda data: tensor_crop(decode_jpeg(torch.frombuffer(bytearray(data),
                                                                                    dtype=torch.uint8))),
    }


def main(argv=None) -> dict:
    parser = command_line("python -m bench.bench_decode", __doc__, notes=False)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one loader worker = one core
    jpegs = img2dataset_jpegs(args.images)
    fns = paths(args.image_size)
    best = {name: float("inf") for name in fns}
    for fn in fns.values():
        fn(jpegs[0])
    for _ in range(args.repeats):
        for name, fn in fns.items():  # alternating, so the machine's noise falls on every path
            started = time.perf_counter()
            for data in jpegs:
                fn(data)
            best[name] = min(best[name], time.perf_counter() - started)
    rates = {name: len(jpegs) / seconds for name, seconds in best.items()}
    sizes = np.array([Image.open(io.BytesIO(j)).size for j in jpegs])
    print(f"{len(jpegs)} JPEGs ({sizes.mean(0).round().astype(int).tolist()} px, "
          f"{np.mean([len(j) for j in jpegs]) / 1e3:.0f} kB), to {args.image_size} px, one core, best of {args.repeats}")
    for name, rate in rates.items():
        print(f"  {name:<20} {rate:8,.0f} images/s per core   {rate / rates['decode']:.2f}x of decode alone")
    print(f"ratio ours / pillow_crop (the tensor resize): {rates['ours'] / rates['pillow_crop']:.2f}x; cores per GPU "
          f"at 2,800 images/s: " + ", ".join(f"{name} {2800 / rate:.1f}" for name, rate in rates.items() if name != "decode"))
    print(json.dumps({"images": len(jpegs), "image_size": args.image_size, "images_per_s_per_core": rates}))
    return rates


if __name__ == "__main__":
    main()
