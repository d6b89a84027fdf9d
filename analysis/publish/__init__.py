"""Publishing a run to the Hugging Face Hub.
"""
