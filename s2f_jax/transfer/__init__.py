"""Task transferability bound (Mehra, Zhang & Hamm): features, Lipschitz heads, transforms, optimal transport."""
