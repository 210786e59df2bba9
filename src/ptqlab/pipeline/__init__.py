"""ptqlab.pipeline."""
