"""Attention maps: rollout and per-layer metrics (tensor math), streaming extraction into the summary file, and
what training changed.
"""
