"""The reefcap captioning HTTP service."""
