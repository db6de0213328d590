"""xenstored: a XenStore daemon in Python (trio + sortedcontainers)."""

__version__ = "0.1.0"
