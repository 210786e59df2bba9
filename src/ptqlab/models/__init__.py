"""ptqlab.models."""
