"""corral fs driver."""
