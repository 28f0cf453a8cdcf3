"""DGA (Ke et al., EMNLP 2022) in its continual version: DAS's ingredients on attention heads only.

General importance of heads from the KL proxy, soft-masking of head gradients by accumulated
importance, and the contrast of the full model against the head-gated one. Its `Args` restrict
every DAS argument that names units to attention heads; every other argument, including the
published-vs-released options of `methods.das`, is DAS's. This continual form is the project's:
the companion code runs DGA one domain at a time from θ0 (`dga-one`, `methods/dga_one.py`).
"""

from dataclasses import dataclass, field

from methods import register
from methods.das import DAS
from methods.das import Args as DASArgs


@dataclass
class Args(DASArgs):
    units: list[str] = field(default_factory=lambda: ["head"])
    softmask_units: list[str] = field(default_factory=lambda: ["head"])


@register("dga")
class DGA(DAS):
    """DAS restricted to attention heads (KL-proxy head importance, soft-masking, contrast)."""

    Args = Args
