"""corral net driver."""
