"""Route torch.nn.functional.scaled_dot_product_attention through fastattn."""
import contextlib

import torch.nn.functional as F

from . import functional

_patched = False


def patch_sdpa():
    """Replace torch.nn.functional.scaled_dot_product_attention with fastattn's.

    Modules that look the function up at call time (nn.MultiheadAttention's
    slow path, most transformer code via `F.scaled_dot_product_attention`)
    then run on fastattn. Returns a context manager: leaving it undoes the
    patch, as does `unpatch_sdpa()`. Patching twice is a no-op.
    """
    global _patched
    if not _patched:
        F.scaled_dot_product_attention = functional.scaled_dot_product_attention
        _patched = True
    return _undo_on_exit()


def unpatch_sdpa():
    """Restore torch's own scaled_dot_product_attention."""
    global _patched
    F.scaled_dot_product_attention = functional._torch_sdpa
    _patched = False


def is_sdpa_patched() -> bool:
    return F.scaled_dot_product_attention is functional.scaled_dot_product_attention


@contextlib.contextmanager
def _undo_on_exit():
    try:
        yield
    finally:
        unpatch_sdpa()
