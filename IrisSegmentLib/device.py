"""Pick the compute device: explicit, and honest about falling back to the CPU."""
from __future__ import annotations

import torch

from .errors import DeviceError

CHOICES = ("auto", "cpu", "cuda")


def out_of_memory_error(torch_module=torch) -> type[BaseException]:
    """The exception a CUDA allocation failure raises in this torch.

    `torch.OutOfMemoryError` only exists from torch 2.5; from 1.13 `torch.cuda.OutOfMemoryError` is the
    same error (an alias of the former since 2.5). Slicer on macOS (x86_64) gets torch 2.2.2 at most."""
    return getattr(torch_module, "OutOfMemoryError", None) or torch_module.cuda.OutOfMemoryError


OutOfMemoryError = out_of_memory_error()


def check_choice(choice: str) -> str:
    """`choice` lower-cased if it names a device this module knows (auto, cpu, cuda, cuda:N), else a DeviceError."""
    choice = (choice or "auto").lower()
    index = choice[5:] if choice.startswith("cuda:") else None
    if choice not in CHOICES and not (index and index.isdigit()):
        raise DeviceError(f"unknown device {choice!r}: use one of {', '.join(CHOICES)} (or cuda:N for the N-th GPU).")
    return choice


def resolve_device(choice: str = "auto") -> torch.device:
    """'auto' uses the CUDA GPU when torch sees one, else the CPU; 'cuda' without a GPU is an error."""
    choice = check_choice(choice)
    if choice == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        if choice.startswith("cuda:") and int(choice[5:]) >= torch.cuda.device_count():
            raise DeviceError(f"{choice} was requested but torch sees {torch.cuda.device_count()} GPU(s), numbered from 0.")
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
