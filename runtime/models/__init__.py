"""The models llmplan runs: local directories, Meta conversion, building and loading."""
