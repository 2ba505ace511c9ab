"""corral: a self-hosted, container-free cloud management layer."""

__version__ = "0.1.0"
