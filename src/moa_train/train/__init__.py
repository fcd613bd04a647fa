"""The training recipe and what it is made of: optimizer and schedule, checkpoints, FSDP2, metrics,
loggers, preemption, and the Hugging Face Trainer integration."""
