"""ptqlab.study."""
