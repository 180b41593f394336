"""Host values to device tensors without making the host wait for the device."""
from __future__ import annotations

import numpy as np
import torch


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)``, but on CUDA through pinned
    memory and a non-blocking copy. A copy from pageable memory makes torch synchronize the
    stream after it, so the host would wait for every queued kernel (a lookahead batch is
    built while the batch before it runs). ``values``: a list, numpy array or CPU tensor."""
    if isinstance(values, np.ndarray):
        host = torch.from_numpy(values).to(dtype)
    elif isinstance(values, torch.Tensor):
        host = values.to(dtype)
    else:
        host = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
