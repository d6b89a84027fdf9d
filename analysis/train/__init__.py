"""The training job: its arguments and config files (args), base models built once and cached (base), and
the job itself (job.run).
"""
