"""llmplan runtime."""
