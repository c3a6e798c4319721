"""reefcap: caption underwater imagery with BLIP models adapted to the underwater domain."""

__version__ = "0.1.0"
