"""Shared by every test: ptqlab is imported before any test computes with torch.

MKL's strict reproducible mode (the same bits whatever the thread count, :mod:`ptqlab.threads`) can only be
switched on before MKL's first matrix product; a test module that multiplied matrices at import time before
importing ptqlab would otherwise leave it off for the whole session.
"""

import ptqlab.threads  # noqa: F401
