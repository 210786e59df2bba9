"""ptqlab.report."""
