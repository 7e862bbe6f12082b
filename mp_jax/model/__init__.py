"""Layer 2, model: the BERT with token pruning and exits, its FLOPs, HF checkpoints <-> params."""
