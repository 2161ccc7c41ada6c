"""Model patching (CAMEL, Goel et al. ICLR 2021): the CycleGAN stage of original.md Patching §4."""
