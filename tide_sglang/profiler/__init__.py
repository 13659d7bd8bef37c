"""`tide profile`: the speculation controller's cost profile, measured on a live engine from outside.

measure.py holds the method (force each step count, time decode steps per batch size, fit a `Profile`), shared by
the black-box profile of a server and by `tide bench control`; server.py drives a server through HTTP and the
control state; startup.py is what `tide serve` does before SGLang starts (the registry's profile, or none).
"""
