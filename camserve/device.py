"""Which device a model serves on: the one TorchServe gives the worker, decided the way
TorchServe's own handlers decide (``BaseHandler.initialize``)."""

from __future__ import annotations

import torch

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
