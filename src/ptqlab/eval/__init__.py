"""ptqlab.eval."""
