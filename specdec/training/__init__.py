"""Training drafters: the self-distillation set, the objectives, and checkpoints (``[train]`` extra for accelerate)."""
