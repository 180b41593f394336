"""Makes the repository root importable for tests (``tests.utils``). On a machine without
CUDA it also turns on Triton's interpreter before any test module imports triton, so that
``tests/kernels`` runs its kernels on CPU in the same pytest process as the rest of the
suite (otherwise an earlier module's import of triton makes those modules skip)."""
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
