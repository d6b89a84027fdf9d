"""Rendering: matplotlib figures, the sentences the report and the card share, the explorer, the Jinja report
and model card (templates/).
"""
