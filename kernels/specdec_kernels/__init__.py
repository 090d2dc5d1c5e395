"""specdec's Triton kernels, installed as ``specdec_kernels`` (never as ``kernels``: transformers
probes for the PyPI package of that name)."""
