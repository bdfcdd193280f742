"""Training objectives: the autoencoder's reconstruction + perceptual + adversarial loss and its parts."""
