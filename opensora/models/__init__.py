"""Models: VAE, T5, STDiT, STDiT2 and their layers."""
