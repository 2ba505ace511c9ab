"""corral lb driver."""
