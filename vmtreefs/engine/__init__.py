"""Snapshot engines: where volume data lives and how it is copied on write."""
