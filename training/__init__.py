"""Training side of reefcap: datasets, underwater optics, adaptation recipes, evaluation."""
