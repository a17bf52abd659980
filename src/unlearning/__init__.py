"""unlearning: remove hazardous knowledge from language models and test that it stays removed."""

__version__ = "0.1.0"
