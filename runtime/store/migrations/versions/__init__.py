"""The job store's schema revisions, oldest first (alembic loads them by path)."""
