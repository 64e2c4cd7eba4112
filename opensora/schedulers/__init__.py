"""Diffusion schedulers."""
