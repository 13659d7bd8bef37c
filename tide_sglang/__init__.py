"""TIDE for SGLang: online EAGLE-3 draft adaptation.

Stages, in the one direction data flows (each imports only the ones before it):
capture -> stream -> draft -> trainer -> control -> engine -> plugin; bench and cli sit on top.
"""

__version__ = "0.1.0"
