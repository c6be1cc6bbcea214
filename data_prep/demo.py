"""Build the demo dataset offline: real images that installed packages ship, served to
the real img2dataset from a loopback HTTP server, sharded like any web dataset.

    python -m data_prep.demo --output data/demo [--image-size 64] [--renders 4]

Sources (both real images, no internet):
* `digits`: scikit-learn's 1,797 handwritten digits (8x8 scans by 43 writers), drawn in
  random dark inks on random light papers at random positions and scales, captioned
  from their label only, with varied templates ("a handwritten seven", "digit 7", ...).
* `photos`: random crops of the photographs scikit-learn (china.jpg, flower.jpg) and
  matplotlib (grace_hopper.jpg) ship, captioned from what they show.

Writes, under --output:
  shards/digits/, shards/photos/   webdataset shards + manifest.yaml (via data_prep.shard)
  eval/digits/{train,test}/<class>/*.png, classnames.txt, zeroshot_classification_templates.txt
      held-out digits (writers' samples never seen in the shards) for zero-shot and linear probe
  urls_digits.parquet, urls_photos.parquet   the url lists img2dataset read (key, url, caption,
      tags: YFCC-style user tags, which img2dataset stores in each sample's .json)
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from data_prep.serve import serve_directory
from data_prep.shard import build_manifest, run_img2dataset
from pipeline.cli import command_line

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Dark inks on light papers: the colours vary (a nuisance the model must learn to ignore)
# but the digit always stands out from its paper, as on a real scan.
INKS = {"black": (20, 20, 20), "blue": (30, 60, 200), "red": (190, 30, 30), "green": (30, 120, 50),
        "purple": (110, 40, 150)}
PAPERS = {"white": (245, 245, 245), "cream": (250, 240, 200), "light gray": (205, 205, 205),
          "light blue": (200, 220, 245), "pink": (245, 205, 215)}
# Captions name the digit and nothing else: ink and paper colours vary as nuisance, so
# the only thing a caption tells apart is the digit (a colour in the caption would be an
# easier cue for the contrastive loss than the shape, and zero-shot asks for the shape).
DIGIT_CAPTIONS = [
    "a handwritten digit {n}", "the number {w} written by hand", "a handwritten {w}",
    "a scanned image of the digit {n}", "a low resolution photo of a handwritten {w}", "{w}, handwritten",
    "a blurry picture of the number {n}", "digit {n}", "a hand-drawn numeral {w}", "the digit {w}",
    "a photo of the number {w}", "handwriting: {n}",
]
ZEROSHOT_TEMPLATES = ["a handwritten digit {c}.", "a photo of the number {c}.", "the number {c} written by hand.",
                      "a scanned image of the digit {c}.", "a blurry picture of the number {c}."]
PHOTO_SOURCES = {  # file -> (class name, caption templates)
    "china.jpg": ("temple", ["a photo of a chinese temple", "an old pagoda among trees", "a temple roof in china",
                             "traditional chinese architecture", "a building with a tiled roof"]),
    "flower.jpg": ("flower", ["a photo of a flower", "a close-up of a pink flower", "petals of a blooming flower",
                              "a flower in a garden", "a macro photo of a blossom"]),
    "grace_hopper.jpg": ("portrait", ["a portrait of a woman in uniform", "a photo of grace hopper",
                                      "an official navy portrait", "a woman wearing a military uniform",
                                      "a black and white style portrait of a person"]),
}


# YFCC-style user tags per source (the `tags` column, stored in each sample's .json):
# PyramidCLIP's tag level reads them.
PHOTO_TAGS = {"china.jpg": "temple, pagoda, china, architecture, roof", "flower.jpg": "flower, blossom, petals, pink",
              "grace_hopper.jpg": "portrait, woman, uniform, navy"}
DIGIT_TAGS = "{w}, {n}, digit, handwriting"


def demo_location() -> Path:
    """Where the tools (bench, bench.topology_drift, ...) look for the demo dataset unless
    told: MSCLIP_DEMO_DATA, else data/demo of the checkout (where `bash launch/demo.sh`
    builds it without --workdir), whatever the working folder."""
    return Path(os.environ.get("MSCLIP_DEMO_DATA") or Path(__file__).resolve().parents[1] / "data" / "demo")


def photo_paths() -> dict[str, Path]:
    import matplotlib
    import sklearn.datasets
    sk = Path(sklearn.datasets.__file__).parent / "images"
    mpl = Path(matplotlib.get_data_path()) / "sample_data"
    return {"china.jpg": sk / "china.jpg", "flower.jpg": sk / "flower.jpg", "grace_hopper.jpg": mpl / "grace_hopper.jpg"}


def render_digit(scan: np.ndarray, size: int, rng: random.Random) -> Image.Image:
    """An 8x8 scan (0..16) drawn in a random dark ink on a random light paper, jittered in
    scale and position."""
    fg, bg = INKS[rng.choice(list(INKS))], PAPERS[rng.choice(list(PAPERS))]
    glyph = Image.fromarray((scan / 16 * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    scale = rng.uniform(0.7, 1.0)
    inner = int(size * scale)
    mask = Image.new("L", (size, size), 0)
    mask.paste(glyph.resize((inner, inner), Image.BICUBIC), (rng.randint(0, size - inner), rng.randint(0, size - inner)))
    image = Image.composite(Image.new("RGB", (size, size), fg), Image.new("RGB", (size, size), bg), mask)
    return image


def write_digits(out_images: Path, eval_dir: Path, size: int, renders: int, seed: int) -> list[tuple[str, str, str]]:
    """Render training digits (files to serve) and the held-out eval set; returns (file, caption, tags) rows."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    idx = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(idx, test_size=0.3, random_state=seed, stratify=digits.target)
    rng = random.Random(seed)
    rows = []
    for i in tqdm(train_idx, desc="digits (train)", unit=" scans"):
        label = int(digits.target[i])
        for r in range(renders):
            image = render_digit(digits.images[i], size, rng)
            name = f"digit_{i:04d}_{r}.png"
            image.save(out_images / name)
            rows.append((name, rng.choice(DIGIT_CAPTIONS).format(n=label, w=NUMBER_WORDS[label]),
                         DIGIT_TAGS.format(n=label, w=NUMBER_WORDS[label])))
    for split, split_idx in (("train", train_idx), ("test", test_idx)):
        for i in tqdm(split_idx, desc=f"digits (eval {split})", unit=" scans"):
            label = int(digits.target[i])
            folder = eval_dir / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            render_digit(digits.images[i], size, rng).save(folder / f"{i:04d}.png")
    (eval_dir / "classnames.txt").write_text("\n".join(NUMBER_WORDS) + "\n")
    (eval_dir / "zeroshot_classification_templates.txt").write_text("\n".join(ZEROSHOT_TEMPLATES) + "\n")
    return rows


def write_photos(out_images: Path, crops_per_photo: int, seed: int) -> list[tuple[str, str, str]]:
    rng = random.Random(seed + 1)
    rows = []
    for file, path in photo_paths().items():
        _, captions = PHOTO_SOURCES[file]
        photo = Image.open(path).convert("RGB")
        W, H = photo.size
        for k in tqdm(range(crops_per_photo), desc=f"photos ({file})", unit=" crops"):
            side = int(min(W, H) * rng.uniform(0.35, 1.0))
            x, y = rng.randint(0, W - side), rng.randint(0, H - side)
            name = f"{Path(file).stem}_{k:03d}.jpg"
            photo.crop((x, y, x + side, y + side)).save(out_images / name, quality=95)
            rows.append((name, rng.choice(captions), PHOTO_TAGS[file]))
    return rows


def build(output: str, image_size: int = 64, renders: int = 4, crops_per_photo: int = 150,
          samples_per_shard: int = 500, seed: int = 0) -> dict[str, Path]:
    out = Path(output)
    if (out / "shards").exists():
        shutil.rmtree(out / "shards")  # a rebuild starts clean (img2dataset would resume otherwise)
    if (out / "eval").exists():
        shutil.rmtree(out / "eval")
    out.mkdir(parents=True, exist_ok=True)
    shard_dirs = {}
    with tempfile.TemporaryDirectory(prefix="demo-images-") as tmp:
        served = Path(tmp)
        sources = {"digits": write_digits(served, out / "eval" / "digits", image_size, renders, seed),
                   "photos": write_photos(served, crops_per_photo, seed)}
        with serve_directory(served) as base_url:
            for name, rows in sources.items():
                random.Random(seed).shuffle(rows)  # shards mix classes
                url_list = out / f"urls_{name}.parquet"
                pq.write_table(pa.table({"key": [str(i) for i in range(len(rows))],
                                         "url": [f"{base_url}/{file}" for file, _, _ in rows],
                                         "caption": [caption for _, caption, _ in rows],
                                         "tags": [tags for _, _, tags in rows]}), url_list)
                shard_dirs[name] = out / "shards" / name
                run_img2dataset(str(url_list), str(shard_dirs[name]), image_size=image_size,
                                samples_per_shard=samples_per_shard, processes=1, threads=16)
                manifest = build_manifest(str(shard_dirs[name]), source=str(url_list))
                manifest.write(str(shard_dirs[name]))
                print(f"[demo] {name}: {len(manifest.shards)} shards, {manifest.total_samples} samples")
    return shard_dirs


def main(argv=None):
    parser = command_line("python -m data_prep.demo", __doc__)
    parser.add_argument("--output", default="data/demo")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--renders", type=int, default=4, help="training renders per digit scan")
    parser.add_argument("--crops-per-photo", type=int, default=150)
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    build(args.output, args.image_size, args.renders, args.crops_per_photo, args.samples_per_shard, args.seed)
    print(f"[demo] wrote {args.output}")


if __name__ == "__main__":
    main()
