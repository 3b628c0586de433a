"""Flow-matching schedulers."""
