"""kopf glue: handlers only trigger the level-based reconcile in reconcile.py."""
