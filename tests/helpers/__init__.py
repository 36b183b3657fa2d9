"""Shared helpers for tests that need real filesystems, mounts or guests."""
