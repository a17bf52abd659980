"""Token masks over forget data: keywords, activation similarity, a linear probe, an SAE."""
