"""Loss surfaces on any PyTorch model: filter-normalized directions, 1D/2D slices, plots."""

__all__: list[str] = []
