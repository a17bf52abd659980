"""Text corpora: sources, readers, tokenisation and batch streams; named hub corpora; the optional real-data tiers."""
