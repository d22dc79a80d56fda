"""Engines: build, load, check and run exported graphs."""
