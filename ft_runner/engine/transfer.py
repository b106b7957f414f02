"""Host values to the device without making the host wait for it.

A copy from pageable host memory makes the host wait until the device's stream has caught up
(CUDA stages it through a buffer of its own), which would undo the in-flight engine's overlap of
host and device work (engine/core.py): every host-to-device copy of a step goes through pinned
memory instead.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A numpy array or a list as a tensor on `device` (of `dtype`, if given), copied asynchronously."""
    if isinstance(values, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(values))
        tensor = tensor if dtype is None else tensor.to(dtype)
    else:
        tensor = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
