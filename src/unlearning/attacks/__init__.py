"""Tamper attacks: fine-tuning an unlearned model through the shared loop, and the curves they record."""
