"""ptqlab.nn."""
