"""Datasets: real images for teachers, classifiers and reference statistics."""
