"""Make a torchvision whose compiled operators cannot load importable (the `[avalanche]` extra).

Avalanche 0.6.0 pulls in torchvision, of which no CPU build of 0.28.0 exists: pip installs the
CUDA build, whose `_C.so` needs `libc10_cuda.so`, which a CPU torch lacks. torchvision then
fails at import ("operator torchvision::nms does not exist", from the fake-tensor kernels it
registers for its operators), and with it `import avalanche` and even `import transformers`,
which imports torchvision whenever it is installed.

`ensure_torchvision_importable()` checks, without importing torchvision, whether its compiled
part loads; only if it does not, it declares the two operator schemas torchvision's Python
side registers kernels for unconditionally, so that the import succeeds (the operators stay
unavailable; nothing in this project calls them). Where torchvision loads (CUDA torch, a
matching CPU build) or is absent, it does nothing. It runs when `benchmark`, `methods` or
`tasks` is imported, before anything imports transformers.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

log = logging.getLogger(__name__)

# the two schemas torchvision/_meta_registrations.py registers fake kernels for unconditionally
# (lines 163 and 177 of torchvision 0.28.0; every other registration checks `_has_ops()` first)
SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # the torch.library.Library holding the declared schemas (kept alive)


def torchvision_library() -> Path | None:
    """The path of torchvision's compiled operator library, or None where it is not installed."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("_C*.so"))
        if found:
            return found[0]
    return None


def ensure_torchvision_importable() -> bool:
    """Declare torchvision's operator schemas if its `_C.so` cannot load; True if it did."""
    global _library
    if _library is not None:
        return True
    path = torchvision_library()
    if path is None:
        return False
    import torch

    try:
        torch.ops.load_library(str(path))
        return False
    except OSError as error:
        log.debug("torchvision's operators do not load (%s); declaring their schemas", error)
    if hasattr(torch.ops.torchvision, "nms"):
        return False  # declared already (torchvision imported, or a second call)
    _library = torch.library.Library("torchvision", "FRAGMENT")  # noqa: TOR901
    for schema in SCHEMAS:
        _library.define(schema)
    return True


ensure_torchvision_importable()
