"""The one training loop and what it uses: optimizers, schedules, losses, LoRA / full fine-tuning set-up."""
