"""Data helpers: distributed and elastic samplers (streaming datasets land here too)."""
