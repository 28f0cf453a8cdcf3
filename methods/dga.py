"""DGA (Ke et al., EMNLP 2022) in its continual version: DAS's ingredients on attention heads only.

General importance of heads from the KL proxy, soft-masking of head gradients by accumulated
importance, and the contrast of the full model against the head-gated one. Its defaults, in
dga.yaml, restrict every DAS argument that names units to attention heads.
"""

from methods import register
from methods.das import DAS


@register("dga")
class DGA(DAS):
    """DAS restricted to attention heads (KL-proxy head importance, soft-masking, contrast)."""
