"""Which device a model serves on (the one TorchServe gives the worker, decided the way
TorchServe's own handlers decide), and the batch's one trip back to the CPU."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

CPU = torch.device("cpu")


def serving_device(system_properties: dict, model_yaml_config: dict | None = None) -> torch.device:
    """``cuda:<gpu_id>`` when TorchServe assigned the worker a GPU and CUDA is available, else
    the CPU.

    TorchServe assigns no ``gpu_id`` when the archive's ``model-config.yaml`` says
    ``deviceType: cpu`` or the server has ``number_of_gpu=0``; ``deviceType: cpu`` is checked
    here too, so the model stays on the CPU even if a GPU id arrives anyway.
    """
    device_type = str((model_yaml_config or {}).get("deviceType", "")).lower()
    gpu_id = system_properties.get("gpu_id")
    if device_type != "cpu" and gpu_id is not None and torch.cuda.is_available():
        return torch.device("cuda", int(gpu_id))
    return CPU


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters (else its buffers) live; the CPU for a stateless model."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return CPU if tensor is None else tensor.device


def blank_input(model: nn.Module, input_size: tuple[int, int]) -> Tensor:
    """An all-zero (1, 3, H, W) batch on the model's device, for the passes that only trace
    the model (which modules run, their output shapes)."""
    return torch.zeros(1, 3, *input_size, device=model_device(model))


def to_host(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The tensors on the CPU, copied in one transfer (one device sync, not one per tensor).

    On the CPU they are returned as they are. Elsewhere they travel as one flat float64
    tensor, which holds float32, int64 class indices (below 2**53) and bools exactly.
    """
    if all(t.device.type == "cpu" for t in tensors):
        return list(tensors)
    return unpack(pack(tensors).cpu(), tensors)


def pack(tensors: Sequence[Tensor]) -> Tensor:
    """One flat float64 tensor holding all of ``tensors``, on their device."""
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])


def unpack(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """The tensors of ``pack(like)`` back, with their shapes and dtypes, on ``flat``'s device."""
    parts = flat.split([t.numel() for t in like])
    return [part.view(t.shape).to(t.dtype) for part, t in zip(parts, like, strict=True)]
