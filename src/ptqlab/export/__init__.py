"""ptqlab.export."""
