"""The base of the package: the output directory's file names, packaged templates and configs, classification
metrics, mean and standard error, the launch check.
"""
