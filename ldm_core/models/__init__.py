"""Neural networks: the autoencoders (KL and VQ), the PatchGAN discriminator, and the denoisers."""
