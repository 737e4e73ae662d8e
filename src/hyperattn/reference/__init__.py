"""Pure-PyTorch reference implementations: the specification the kernels are tested against."""
