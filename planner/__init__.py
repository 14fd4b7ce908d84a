"""llmplan planner."""
