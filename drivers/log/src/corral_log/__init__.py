"""corral log driver."""
