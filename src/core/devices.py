"""Where tensors run: the default device and its mixed-precision context."""
from __future__ import annotations

import contextlib

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing on the CPU (bf16 there is slower and less exact)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


TORCHSORT_REBUILD = ("rebuild it where nvcc is on PATH (`make setup TORCHSORT_CUDA=1` after deleting "
                     ".venv/.torchsort-installed), or train on the CPU (CUDA_VISIBLE_DEVICES=)")


def torchsort_cuda_error() -> str | None:
    """Why torchsort's CUDA extension cannot be used (None when it can). Without ``nvcc`` at install
    time torchsort builds CPU-only; its ``soft_rank`` on a CUDA tensor then raises ImportError."""
    try:
        import torchsort.isotonic_cuda  # noqa: F401 -- the module torchsort's CUDA ops come from
    except ImportError as err:
        return str(err).splitlines()[0] or type(err).__name__
    return None


def check_device(device: torch.device) -> None:
    """A device training can use: on CUDA, torchsort must have its CUDA extension."""
    if device.type != "cuda":
        return
    reason = torchsort_cuda_error()
    if reason is not None:
        from src.core.errors import InputError

        raise InputError(f"torchsort has no CUDA extension ({reason}), but training runs on {device}: "
                         + TORCHSORT_REBUILD)


def main() -> None:
    """Set-up's check: where torch sees a GPU, torchsort's soft_rank must run on it (exit 1 if not)."""
    import sys

    if not torch.cuda.is_available():
        print("torchsort: no CUDA device, the CPU extension serves")
        return
    reason = torchsort_cuda_error()
    if reason is None:
        import torchsort

        try:
            torchsort.soft_rank(torch.randn(2, 8, device="cuda"))
        except (ImportError, RuntimeError) as err:
            reason = str(err).splitlines()[0]
    if reason is not None:
        print(f"error: torch sees {torch.cuda.get_device_name()} but torchsort cannot rank on it ({reason}); "
              + TORCHSORT_REBUILD, file=sys.stderr)
        raise SystemExit(1)
    print(f"torchsort: CUDA extension runs on {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()
