"""ptqlab.data."""
