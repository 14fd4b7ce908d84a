"""Fine-tuning: the recipe, its config, data parallelism, the job driver."""
