"""Inference: the recipe, its engine, Ray replicas, the job driver, the OpenAI-compatible server."""
