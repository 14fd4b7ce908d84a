"""Text in and out of models: dialogs, data files and formats, tokenised data, prompt templates."""
