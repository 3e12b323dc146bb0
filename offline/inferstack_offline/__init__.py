"""Offline work with the served model: `inferstack batch` on Spark (batch*.py, spark.py)."""
