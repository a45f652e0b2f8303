"""Evaluation: feature networks, distances, and the generate -> features -> metrics harness."""
