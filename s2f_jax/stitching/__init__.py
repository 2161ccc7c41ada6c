"""Model stitching (Balogh & Jelasity, AAAI 2025): stitching layers, direct matching, low-rank projections and
energy-based OOD detectors on representations."""
