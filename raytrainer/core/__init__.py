"""The per-rank core: run session, loop state, loops, results, precision, stop control, events."""
