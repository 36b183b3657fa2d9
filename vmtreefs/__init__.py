"""vmtreefs: virtual machines as directories, run with ordinary file operations."""

__version__ = "0.1.0"
