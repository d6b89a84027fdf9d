"""A smaller, faster model: which blocks go (blocks), distillation (distill), speed (speed), the search and
its result (run, result), the output folder claim (claim), the command's flags (flags).
"""
