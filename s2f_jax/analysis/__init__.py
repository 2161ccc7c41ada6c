"""Analysis tools: representation similarity, shift quantities (W2), interpolation paths, weight projections and
the joint model's weight changes."""
