"""Studies of a trained model: background variants, layer and head importance, faithfulness of the maps, and
what holds across training runs.
"""
