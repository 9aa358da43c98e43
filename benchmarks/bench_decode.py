"""Task-API decode benchmark: full JPEG decode vs the draft (DCT-domain downscaled) decode, measured
in one run, and the draft's top-1 parity with the full decode.

    python benchmarks/bench_decode.py                          # timing only (12 MP JPEGs, 224 px model)
    python benchmarks/bench_decode.py --repository models      # timing with its preprocessing, plus parity

Timing: ``tlserve.server.preprocess.decode`` (decode + RGB + resize + crop, what one decode thread
does per image) on 12 MP (4032x3024) JPEGs, full and draft alternating image by image so that
load from elsewhere on the machine hits them alike; the median of ``--repeats`` per cell. Besides
the decode, ``simplejpeg`` (libjpeg-turbo, scaled decode to the same size) is timed when it is
installed, to show whether another decoder would win.

Parity (with ``--repository``): the demo's validation images (Fashion-MNIST, grey 28x28) upscaled
to ``--size`` and the bundled real photos (native and upscaled), each as a quality-90 JPEG, through
the model's graph once fully decoded and once drafted: the share whose top-1 class agrees, and the
largest |difference| of any probability.
"""

from __future__ import annotations

import argparse
import io
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from tlserve.geometry import resized_size
from tlserve.manifest import Manifest, Preprocessing
from tlserve.server.preprocess import DRAFT_KEEP, ImageLimits, decode

log = logging.getLogger("bench_decode")
LIMITS = ImageLimits(max_image_bytes=64 << 20, max_pixels=64_000_000)
PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "camera.png", "motorcycle_left.png", "rocket.jpg")


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def photo_paths() -> list[Path]:
    import matplotlib
    import skimage.data

    paths = [Path(skimage.data.data_dir) / name for name in PHOTOS]
    return paths + [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]


def mosaic(size: tuple[int, int], tile: int = 400) -> Image.Image:
    """Crops of the real photos at native resolution tiled over ``size``, plus mild sensor-like
    noise: the detail (and file size, about 3.5 MB at 12 MP) of a phone photo, unlike an upscale."""
    canvas = Image.new("RGB", size)
    photos = [Image.open(p).convert("RGB") for p in photo_paths()]
    i = 0
    for top in range(0, size[1], tile):
        for left in range(0, size[0], tile):
            photo = photos[i % len(photos)]
            x, y = (i * 37) % max(1, photo.width - tile), (i * 53) % max(1, photo.height - tile)
            canvas.paste(photo.crop((x, y, x + tile, y + tile)), (left, top))
            i += 1
    noise = np.random.default_rng(0).normal(0, 4, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(canvas) + noise, 0, 255).astype(np.uint8))


def timing_images(size: tuple[int, int]) -> dict[str, bytes]:
    upscaled = Image.open(photo_paths()[2]).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    return {"astronaut.png upscaled": jpeg(upscaled), "photo mosaic + noise": jpeg(mosaic(size))}


def simplejpeg_decoder(pre: Preprocessing) -> Callable[[bytes], object] | None:
    try:
        import simplejpeg
    except ImportError:
        return None

    def run(data: bytes) -> object:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        target = resized_size(width, height, pre.resize_size)
        rgb = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=target[0], min_height=target[1])
        return Image.fromarray(rgb).resize(target, Image.Resampling.BILINEAR)

    return run


def timing(pre: Preprocessing, size: tuple[int, int], repeats: int, keeps: list[int]) -> list[str]:
    """Per image and way: the median CPU time of the decoding thread (``time.thread_time``: what the
    work costs, whatever else runs on the machine) and the median wall time."""
    ways: dict[str, Callable[[bytes], object]] = {"full": lambda data: decode(data, pre, LIMITS)}
    for keep in keeps:
        ways[f"draft x{keep}"] = lambda data, keep=keep: decode(data, pre, LIMITS, draft=True, draft_keep=keep)
    other = simplejpeg_decoder(pre)
    if other:
        ways["simplejpeg"] = other
    lines = [
        "| image | bytes | " + " | ".join(f"{w} CPU ms | {w} wall ms" for w in ways) + " |",
        "|---|---:|" + "---:|---:|" * len(ways),
    ]
    for name, data in timing_images(size).items():
        cpu: dict[str, list[float]] = {w: [] for w in ways}
        wall: dict[str, list[float]] = {w: [] for w in ways}
        for _ in range(repeats + 1):  # the first pass warms up
            for way, run in ways.items():
                c0, t0 = time.thread_time(), time.perf_counter()
                run(data)
                cpu[way].append(time.thread_time() - c0)
                wall[way].append(time.perf_counter() - t0)
        c = {w: statistics.median(t[1:]) * 1e3 for w, t in cpu.items()}
        w_ = {w: statistics.median(t[1:]) * 1e3 for w, t in wall.items()}
        cells = " | ".join(f"{c[w]:.1f} | {w_[w]:.1f}" for w in ways)
        lines.append(f"| {name} | {len(data):,} | {cells} |")
    return lines


def parity_files(size: tuple[int, int], count: int) -> list[bytes]:
    from tlserve.trainer.demo_data import load_arrays

    val = load_arrays()["val_x"]
    index = np.linspace(0, len(val) - 1, min(count, len(val))).round().astype(int)
    files = [jpeg(Image.fromarray(val[i]).convert("RGB").resize(size, Image.Resampling.BICUBIC)) for i in index]
    for path in photo_paths():
        with Image.open(path) as img:
            rgb = img.convert("RGB")
        files += [jpeg(rgb), jpeg(rgb.resize(size, Image.Resampling.BICUBIC))]
    return files


def parity(model_file: Path, size: tuple[int, int], count: int, keeps: list[int]) -> list[str]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    manifest = Manifest.from_metadata(session.get_modelmeta().custom_metadata_map)
    pre, files = manifest.preprocessing, parity_files(size, count)

    def probabilities(draft: bool, keep: int = 1) -> np.ndarray:
        rows = []
        for i in range(0, len(files), 32):
            batch = np.stack([decode(f, pre, LIMITS, draft=draft, draft_keep=keep) for f in files[i : i + 32]])
            rows.append(session.run([manifest.outputs.probabilities], {manifest.input_name: batch})[0])
        return np.concatenate(rows)

    full = probabilities(False)
    photos = 2 * len(photo_paths())
    lines = []
    for keep in keeps:
        drafted = probabilities(True, keep)
        agree = full.argmax(1) == drafted.argmax(1)
        lines.append(
            f"parity on {model_file.parent.parent.name} ({manifest.architecture}, {pre.input_size} px, resize "
            f"{pre.resize_size}), draft keeping >= {keep}x the target: top-1 agrees on {int(agree.sum())}/"
            f"{len(files)} = {agree.mean():.2%} (demo val images at {size[0]}x{size[1]}: "
            f"{int(agree[:-photos].sum())}/{len(files) - photos}, photos native + upscaled: "
            f"{int(agree[-photos:].sum())}/{photos}); max |Δprob| {np.abs(full - drafted).max():.4f}, "
            f"mean |Δprob| {np.abs(full - drafted).mean():.5f}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, help="a model repository: its first model's preprocessing + parity")
    parser.add_argument("--size", type=int, nargs=2, default=[4032, 3024], metavar=("W", "H"))
    parser.add_argument("--repeats", type=int, default=10, help="timed decodes per cell (median)")
    parser.add_argument("--count", type=int, default=100, help="demo validation images in the parity check")
    parser.add_argument(
        "--keep",
        type=int,
        nargs="+",
        default=[DRAFT_KEEP],
        help="draft factors to compare: the draft keeps at least this many times the resize target per side",
    )
    parser.add_argument("--no-timing", action="store_true", help="parity only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    size = (args.size[0], args.size[1])
    model_file = None
    pre = Preprocessing(input_size=224, resize_size=256)
    if args.repository:
        model_file = sorted(args.repository.glob("*/*/model.onnx"))[-1]
        import onnx

        metadata = {p.key: p.value for p in onnx.load(str(model_file), load_external_data=False).metadata_props}
        pre = Manifest.from_metadata(metadata).preprocessing
    print(f"decode + preprocess of {size[0]}x{size[1]} JPEGs (quality 90) to {pre.input_size} px, one thread:")
    if not args.no_timing:
        print("\n".join(timing(pre, size, args.repeats, args.keep)))
    if model_file:
        print("\n".join(parity(model_file, size, args.count, args.keep)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
