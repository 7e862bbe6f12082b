"""Layer 6, training: stage losses and steps, the staged trainer, checkpoints, workdir records."""
