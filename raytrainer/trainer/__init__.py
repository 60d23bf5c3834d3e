"""Trainer, plan and loops."""
