"""Data: synthetic clips, video I/O and datasets."""
