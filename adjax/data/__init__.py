"""Datasets, image transforms and grain input pipelines. Knows nothing about models."""
