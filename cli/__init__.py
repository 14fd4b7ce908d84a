"""llmplan cli."""
