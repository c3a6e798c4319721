"""Clients of reefcap: the Python HTTP client and offline batch captioning."""
