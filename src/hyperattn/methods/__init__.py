"""One driver per method: picks the backend (SDPA, kernels, reference), owns autograd and stats."""
