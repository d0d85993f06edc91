"""Pure math, no I/O: the CNTK (reference, fast CPU, cupy GPU) and the Meta Neural Kernel."""

from .cntk import BACKENDS, check_images, cntk, cntk_block, resolve_backend
from .scales import box3, scale_maps

__all__ = ["BACKENDS", "box3", "check_images", "cntk", "cntk_block", "resolve_backend", "scale_maps"]
