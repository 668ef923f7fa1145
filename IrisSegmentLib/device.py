"""Pick the compute device: explicit, and honest about falling back to the CPU."""
from __future__ import annotations

import torch

from .errors import DeviceError

CHOICES = ("auto", "cpu", "cuda")


def resolve_device(choice: str = "auto") -> torch.device:
    """'auto' uses the CUDA GPU when torch sees one, else the CPU; 'cuda' without a GPU is an error."""
    choice = (choice or "auto").lower()
    if choice not in CHOICES and not choice.startswith("cuda:"):
        raise DeviceError(f"unknown device {choice!r}: use one of {', '.join(CHOICES)}.")
    if choice == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda" if choice == "auto" else choice)
    if choice == "auto":
        return torch.device("cpu")
    raise DeviceError(
        "CUDA was requested but torch sees no usable GPU (no NVIDIA driver, or a CPU-only torch build). "
        "Choose the CPU, or install a CUDA build of torch that matches the driver."
    )


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"CUDA GPU {torch.cuda.get_device_name(device)}"
    return f"CPU ({torch.get_num_threads()} threads)"
