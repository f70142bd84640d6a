"""``python -m src.bench encoders``: what an encoder costs to embed with and to cache, on this machine.

For each encoder (default: ``resnet10t`` at the pipeline's 32 px, ``convnext_small`` and a ViT-L/16 built
as the ``uni`` preset, all at random weights, each at its own input size) it prints the embedding
throughput (images/s; inference, batches of ``--batch``, fp32 on a CPU, bf16 autocast on CUDA), the
peak memory of the process that ran it, and the feature cache's bytes per spot for the 8 dihedral
variants a study caches: pooled embeddings (``model.unfrozen_blocks`` 0, the default) and the
activations before the last block (1). Each encoder runs in its own process, so its peak memory is its
own. With ``--spots N`` it projects the minutes a study's first cache build takes for N training spots.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

DEFAULT_ENCODERS = ("resnet10t", "convnext_small", "uni")
VARIANTS = 8  # dihedral variants a study caches with train.flips


def measure(name: str, batch: int, seconds: float, input_size: int) -> dict:
    """Throughput and cache sizes of one encoder (random weights), in this process."""
    import resource
    from dataclasses import replace

    import timm
    import torch

    from src.core.config import load_params
    from src.core.devices import autocast, default_device
    from src.model.encoders import PRESETS, layer_args, resolve_encoder
    from src.model.network import SpatialCellModel

    device = default_device()
    encoder = resolve_encoder(name)
    torch.manual_seed(0)
    backbone = timm.create_model(encoder.architecture, pretrained=False, num_classes=0, **layer_args(encoder.args))
    cfg = replace(load_params().model, backbone=name, input_size=input_size, unfrozen_blocks=0, weights="")
    model = SpatialCellModel(cfg, n_outputs=35, backbone=backbone, encoder=encoder).eval().to(device)
    size = model.preprocessing.input_size
    images = torch.randn(batch, 3, size, size, device=device)
    shapes = {}
    with torch.inference_mode(), autocast(device):
        for cut, label in ((len(model.blocks), "pooled"), (len(model.blocks) - 1, "before_last_block")):
            out = model.split_at(cut).prefix(images[:1])
            shapes[label] = (tuple(out.shape[1:]), out.element_size())
        model.forward_features(images)  # warm-up
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds or done < 2 * batch:
            model.forward_features(images)
            done += batch
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    bytes_per_spot = {label: VARIANTS * int(torch.Size(shape).numel()) * itemsize
                      for label, (shape, itemsize) in shapes.items()}
    return {"encoder": name, "architecture": encoder.architecture, "input_size": size,
            "params_m": sum(p.numel() for p in backbone.parameters()) / 1e6,
            "images_per_s": done / elapsed, "batch": batch, "device": str(device),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "pooled_shape": shapes["pooled"][0], "tokens_shape": shapes["before_last_block"][0],
            "cache_bytes_pooled": bytes_per_spot["pooled"], "cache_bytes_tokens": bytes_per_spot["before_last_block"],
            "foundation": PRESETS.get(name).foundation if name in PRESETS else False}


def run(encoders: list[str], batch: int, seconds: float, input_size: int, log=print) -> list[dict]:
    rows = []
    for name in encoders:
        command = [sys.executable, "-m", "src.bench.encoders", name, "--batch", str(batch), "--seconds", str(seconds),
                   "--input-size", str(input_size)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            log(f"{name}: failed ({done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode})")
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        log(f"{name}: {rows[-1]['images_per_s']:.1f} images/s")
    return rows


def report(rows: list[dict], spots: int = 0) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    table = Table(title=f"encoders at random weights on {rows[0]['device'] if rows else '-'}: embedding and caching")
    for column in ("encoder", "architecture", "M params", "input px", "images/s", "peak RSS MB",
                   "cache KB/spot, pooled (k=0)", "cache KB/spot, tokens (k=1)", "tokens / pooled"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["encoder"], r["architecture"], f"{r['params_m']:.1f}", str(r["input_size"]),
                      f"{r['images_per_s']:.1f}", f"{r['peak_rss_mb']:.0f}", f"{r['cache_bytes_pooled'] / 1e3:.1f}",
                      f"{r['cache_bytes_tokens'] / 1e3:.1f}", f"{r['cache_bytes_tokens'] / r['cache_bytes_pooled']:.0f}x")
    console.print(table)
    console.print(f"cache: {VARIANTS} dihedral variants a spot (train.flips), stored in the dtype the device computes "
                  "(fp32 on a CPU, bf16 on CUDA); k=1 caches the activation before the last block")
    if spots:
        for r in rows:
            minutes = VARIANTS * spots / r["images_per_s"] / 60
            console.print(f"{r['encoder']}: the first cache of {spots} training spots takes {minutes:.1f} min to embed "
                          f"and {spots * r['cache_bytes_pooled'] / 1e6:.1f} MB (k=0) or "
                          f"{spots * r['cache_bytes_tokens'] / 1e9:.2f} GB (k=1)")


def main(argv: list[str] | None = None) -> None:
    """The child process of one encoder: ``python -m src.bench.encoders NAME`` prints its row as JSON."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m src.bench.encoders")
    parser.add_argument("encoder")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--input-size", type=int, default=32)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.encoder, args.batch, args.seconds, args.input_size)))


if __name__ == "__main__":
    main()
