"""ft_runner: HuggingFace causal LMs converted to FasterTransformer's checkpoint layout,
sharded over a TP x PP grid of MPI ranks, and served from rank 0 through PyTriton."""

__version__ = "0.1.0"
