"""Layer 1, data: task files and registries -> examples -> token rows -> padded batches. No JAX."""
