"""SAF: Sharpness-Aware Training for Free (Du et al., NeurIPS 2022), with SGD, SAM, ASAM, MESA."""

__all__: list[str] = []
