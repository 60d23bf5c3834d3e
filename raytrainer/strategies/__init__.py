"""Strategies: device placement and collectives."""
