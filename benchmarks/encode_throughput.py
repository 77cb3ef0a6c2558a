"""Encode throughput: the whole pipeline vs the encoder's forward alone, side by side.

Makes N synthetic JPEG covers, then measures images/s of
  (a) `encode_images` into a temporary cache: decoding + preprocessing in DataLoader workers,
      transfer, forward, HDF5 writes (the loop time the summary reports; model building excluded);
  (b) the encoder's forward alone on pre-decoded, pre-transformed tensors already on the device,
      with the same batch size (and, on CUDA, the same autocast),
and prints both and the ratio (a)/(b). A ratio near 1 means decoding hides behind the model.

Defaults (ViT-B-32, random init, 224 px, 128 covers of 256x256, batch 32, best of 2 alternating
runs each) take one to two minutes on 2 CPU cores.
DataLoader workers run with one torch thread each (PyTorch's default), so they only decode;
`--threads` sets the main process's torch threads (default: torch's choice).

    python benchmarks/encode_throughput.py [--model ViT-B-32] [--images 256] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pixelrec.data.images import open_image_store
from pixelrec.encode import EncodeConfig, EncoderConfig, build_encoder, encode_images
from pixelrec.runtime import autocast_for, resolve_device, set_quiet


def make_covers(root: Path, n: int, side: int, seed: int = 0) -> None:
    """Smooth colour fields plus noise: photo-like JPEGs that cost something to decode and resize."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((side, side), Image.BICUBIC), dtype=np.int16)
        noisy = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(root / f"cover{i:06d}.jpg", quality=90)


def forward_alone(encoder, pixels: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """images/s of the encoder on tensors already preprocessed and on the device."""
    with torch.inference_mode(), autocast_for(device, "auto"):  # the pipeline's autocast
        encoder(pixels[:batch_size])  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for start in range(0, len(pixels), batch_size):
            encoder(pixels[start : start + batch_size]).float().cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return len(pixels) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--images", type=int, default=128, help="number of synthetic covers")
    parser.add_argument("--cover-size", type=int, default=256, help="side of the synthetic JPEG covers")
    parser.add_argument("--image-size", type=int, default=None, help="encoder input size (model default)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the main process")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the best is reported")
    args = parser.parse_args()

    set_quiet(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    enc_cfg = EncoderConfig(model=args.model, image_size=args.image_size)
    encoder = build_encoder(enc_cfg, device)

    with tempfile.TemporaryDirectory() as tmp:
        covers = Path(tmp) / "covers"
        covers.mkdir()
        make_covers(covers, args.images, args.cover_size)

        store = open_image_store(covers)
        loader = encoder.pixel_loader(store)
        pixels = torch.stack([loader(i) for i in store.ids()]).to(device)  # [N, 3, S, S], decoded once up front
        encode_cfg = EncodeConfig(images=str(covers), out=str(Path(tmp) / "cache.h5"), encoder=enc_cfg,
                                  batch_size=args.batch_size, num_workers=args.workers, device=args.device,
                                  overwrite=True)
        forward_runs, pipeline_runs = [], []
        for _ in range(args.repeats):  # alternate, so slow drifts of the machine hit both alike
            forward_runs.append(forward_alone(encoder, pixels, args.batch_size, device))
            pipeline_runs.append(encode_images(encode_cfg, encoder=encoder).images_per_s)
        forward_ips, pipeline_ips = max(forward_runs), max(pipeline_runs)

    print(f"device {device} ({os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads), "
          f"model {args.model} random init at {encoder.image_size} px, batch {args.batch_size}, "
          f"{args.workers} workers, {args.images} covers of {args.cover_size}x{args.cover_size} JPEG"
          f"{', AMP' if device.type == 'cuda' else ''}")
    print(f"(b) forward alone   {forward_ips:8.1f} images/s  (runs: {', '.join(f'{v:.1f}' for v in forward_runs)})")
    print(f"(a) whole pipeline  {pipeline_ips:8.1f} images/s  (runs: {', '.join(f'{v:.1f}' for v in pipeline_runs)})")
    print(f"ratio (a)/(b)       {pipeline_ips / forward_ips:8.3f}")


if __name__ == "__main__":
    main()
