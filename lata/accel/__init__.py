"""Speed paths behind the engine's interface: slice workers and compute helpers, the fused CPU kernels,
the staged transfer pipeline for accelerators. Each gives the plain path's values."""
